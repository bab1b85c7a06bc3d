"""Schedules over HTTP: ``/v1/schedules`` and the service behind it.

A schedule is replicated state, so any peer creates, lists, pauses or deletes
one by proposing a command; the leader of the moment fires its ticks
(mesh/schedules.py). Tenant rules are those of runs: a tenant token creates
schedules as its own tenant only and sees no other tenant's (404). Schedule
ids are one namespace for the whole mesh, so an id another tenant holds is a
409 like any id in use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from raftmesh.consensus import commands
from raftmesh.consensus.results import Done, Rejected, Result, ScheduleSaved
from raftmesh.consensus.schedules import CATCHUP_NONE, OVERLAP_SKIP, Schedule
from raftmesh.mesh.api import _json_body, principal
from raftmesh.mesh.errors import BadRequest, Forbidden, MeshError, ScheduleNotFound, refusal
from raftmesh.mesh.proposer import Proposer, new_id, now_ms
from raftmesh.mesh.schedules import BadSchedule, When, next_tick, parse_when
from raftmesh.mesh.schemas import SCHEDULE_RULES, ScheduleRequest, parse_request

# A schedule stays in the replicated state (every snapshot carries it) until
# it is deleted, unlike a run's input: large inputs go by reference.
MAX_SCHEDULE_INPUT_BYTES = 64 * 1024


class ScheduleService:
    """``check_agent(agent, input)`` raises the API error a run submission
    of that agent and input would get (MeshService.check_agent)."""

    def __init__(self, proposer: Proposer, check_agent: Callable[[str, Any], None]) -> None:
        self._proposer = proposer
        self._check_agent = check_agent

    async def create(self, body: Any, tenant: str | None) -> tuple[dict[str, Any], bool]:
        """``tenant``: the caller's (None for an admin, who may name any)."""
        request = parse_request(body, ScheduleRequest, rules=SCHEDULE_RULES)
        if tenant is not None and request.tenant not in (None, tenant):
            raise Forbidden(
                f"this token schedules as tenant {tenant!r}, not {request.tenant!r}: "
                "leave 'tenant' out or use a token of that tenant"
            )
        try:
            when = parse_when(request.cron, request.every_s, request.timezone)
        except BadSchedule as exc:
            raise BadRequest(str(exc)) from None
        if len(msgspec.json.encode(request.input)) > MAX_SCHEDULE_INPUT_BYTES:
            raise BadRequest(
                f"a schedule's input must be at most {MAX_SCHEDULE_INPUT_BYTES} bytes of JSON "
                "(it lives in the replicated state); pass a reference to larger data"
            )
        self._check_agent(request.agent, request.input)
        cmd = commands.ScheduleSet(
            new_id(),
            now_ms(),
            schedule=request.id,
            cron=when.cron,
            every_ms=when.every_ms,
            timezone=when.timezone,
            agent=request.agent,
            input=request.input,
            tenant=tenant or request.tenant or "default",
            overlap=request.overlap or OVERLAP_SKIP,
            catchup=request.catchup or CATCHUP_NONE,
        )
        result = await self._proposer.propose(cmd)
        if not isinstance(result, ScheduleSaved):
            raise _refused(result, f"schedule {request.id} was not created")
        return self.get(request.id, tenant), result.created

    def list(self, tenant: str | None) -> list[dict[str, Any]]:
        with self._proposer.read() as state:
            mine = [s for s in state.schedules.values() if tenant in (None, s.tenant)]
            return [schedule_view(s) for s in sorted(mine, key=lambda s: s.id)]

    def get(self, schedule_id: str, tenant: str | None) -> dict[str, Any]:
        with self._proposer.read() as state:
            return schedule_view(_visible(state.schedules.get(schedule_id), schedule_id, tenant))

    async def delete(self, schedule_id: str, tenant: str | None) -> dict[str, Any]:
        view = self.get(schedule_id, tenant)
        await self._change(commands.ScheduleDelete(new_id(), now_ms(), schedule_id), "deleted")
        return view

    async def pause(self, schedule_id: str, tenant: str | None) -> dict[str, Any]:
        self.get(schedule_id, tenant)
        await self._change(commands.SchedulePause(new_id(), now_ms(), schedule_id), "paused")
        return self.get(schedule_id, tenant)

    async def resume(self, schedule_id: str, tenant: str | None) -> dict[str, Any]:
        self.get(schedule_id, tenant)
        await self._change(commands.ScheduleResume(new_id(), now_ms(), schedule_id), "resumed")
        return self.get(schedule_id, tenant)

    async def _change(self, cmd: commands.Command, what: str) -> None:
        result = await self._proposer.propose(cmd)
        if not isinstance(result, Done):
            raise _refused(result, f"schedule {getattr(cmd, 'schedule', '?')} was not {what}")


def _visible(schedule: Schedule | None, schedule_id: str, tenant: str | None) -> Schedule:
    if schedule is None or tenant not in (None, schedule.tenant):
        raise ScheduleNotFound(f"no schedule with id {schedule_id!r} in this mesh")
    return schedule


def _refused(result: Result, what: str) -> MeshError:
    if isinstance(result, Rejected):
        return refusal(result.reason, f"{what}: {result.message}")
    return MeshError(f"{what}: unexpected answer {result!r}")


def schedule_view(schedule: Schedule) -> dict[str, Any]:
    """The API's form of a schedule (mesh.schemas.ScheduleView): seconds,
    not ms, and the next tick as this peer's calendar computes it."""
    when = When(schedule.cron, schedule.every_ms, schedule.timezone)
    try:
        upcoming: int | None = None if schedule.paused else next_tick(when, schedule.last_tick_ms)
    except (BadSchedule, ValueError):
        upcoming = None
    fired_or_skipped = schedule.fired + schedule.skipped > 0
    return {
        "id": schedule.id,
        "cron": schedule.cron,
        "every_s": None if schedule.every_ms is None else schedule.every_ms / 1000,
        "timezone": schedule.timezone,
        "agent": schedule.agent,
        "input": schedule.input,
        "tenant": schedule.tenant,
        "overlap": schedule.overlap,
        "catchup": schedule.catchup,
        "paused": schedule.paused,
        "created_at": schedule.created_at_ms / 1000,
        "last_tick_at": schedule.last_tick_ms / 1000 if fired_or_skipped else None,
        "next_tick_at": None if upcoming is None else upcoming / 1000,
        "last_run": schedule.last_run,
        "fired": schedule.fired,
        "skipped": schedule.skipped,
    }


def add_schedule_routes(app: web.Application, schedules: ScheduleService) -> None:
    async def create(request: web.Request) -> web.Response:
        who = principal(request)
        view, created = await schedules.create(await _json_body(request), who.tenant)
        return web.json_response(view, status=201 if created else 200)

    async def list_(request: web.Request) -> web.Response:
        who = principal(request)
        return web.json_response({"schedules": schedules.list(who.tenant)})

    async def show(request: web.Request) -> web.Response:
        who = principal(request)
        return web.json_response(schedules.get(request.match_info["id"], who.tenant))

    async def delete(request: web.Request) -> web.Response:
        who = principal(request)
        return web.json_response(await schedules.delete(request.match_info["id"], who.tenant))

    async def pause(request: web.Request) -> web.Response:
        who = principal(request)
        return web.json_response(await schedules.pause(request.match_info["id"], who.tenant))

    async def resume(request: web.Request) -> web.Response:
        who = principal(request)
        return web.json_response(await schedules.resume(request.match_info["id"], who.tenant))

    app.router.add_post("/v1/schedules", create)
    app.router.add_get("/v1/schedules", list_)
    app.router.add_get("/v1/schedules/{id}", show)
    app.router.add_delete("/v1/schedules/{id}", delete)
    app.router.add_post("/v1/schedules/{id}/pause", pause)
    app.router.add_post("/v1/schedules/{id}/resume", resume)
