"""The API a peer serves (``PeerAPI``): submissions, runs, events, cluster views.

Any peer answers any request. Writes become replicated commands through the
proposer; reads come from the replicated state while a run is active and from
storage once it has ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from prometheus_client import generate_latest

from raftmesh.consensus import commands
from raftmesh.consensus.spec import RunSpec, SpecError
from raftmesh.consensus.state import PEER_UP, QUEUED, RUNNING, SETTLING
from raftmesh.mesh.api import SUBMIT_FIELDS, validate_submission
from raftmesh.mesh.auth import Authenticator
from raftmesh.mesh.errors import (
    BadRequest,
    Conflict,
    NotLeader,
    RunNotFound,
    TooManyRequests,
    Unavailable,
    UnknownAgentError,
    from_storage,
)
from raftmesh.mesh.events import EventHub, Frame
from raftmesh.mesh.liveness import Liveness
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.proposer import Proposer, new_id, now_ms
from raftmesh.mesh.queue_view import queue_summary, slot_use
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.mesh.settings import Settings
from raftmesh.mesh.views import active_view, listed_status, view_from_row, view_from_state
from raftmesh.runner.payload import pack, unpack
from raftmesh.runner.registry import InvalidInput, Registry
from raftmesh.storage.base import (
    DEAD_LETTER_STATUSES,
    TERMINAL_STATUSES,
    RunRow,
    StorageUnavailable,
    Store,
)

log = logging.getLogger("raftmesh.service")

ACTIVE_STATUSES = frozenset({QUEUED, RUNNING})
ALL_STATUSES = ACTIVE_STATUSES | TERMINAL_STATUSES


class MeshService:
    """Implements ``mesh.api.PeerAPI`` for one peer."""

    def __init__(
        self,
        settings: Settings,
        incarnation: str,
        internal_token: str,
        proposer: Proposer,
        store: Store,
        events: EventHub,
        registry: Registry,
        scheduler: Scheduler,
        liveness: Liveness,
        metrics: Metrics,
        busy: Callable[[], int],
        wake_leader: Callable[[], None],
    ) -> None:
        """``busy()`` counts this peer's running attempts; ``wake_leader()``
        asks the leader duty to run now (to settle an outcome being waited on)."""
        self.settings = settings
        self.id = settings.id
        self.incarnation = incarnation
        self.auth = Authenticator.build(settings.api_token, settings.api_tokens_file)
        self.internal_token = internal_token
        self.max_body_bytes = settings.max_body_bytes
        self.max_streams = settings.max_streams
        self.max_streams_per_token = settings.max_streams_per_token
        self._proposer = proposer
        self.store = store
        self.events = events
        self.registry = registry
        self.scheduler = scheduler
        self.liveness = liveness
        self.metrics = metrics
        self._busy = busy
        self._wake_leader = wake_leader
        # asyncio keeps only weak references to tasks: hold detached ones here.
        self._detached: set[asyncio.Task[None]] = set()

    def _detach(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def close(self) -> None:
        for task in list(self._detached):
            task.cancel()
        await asyncio.gather(*self._detached, return_exceptions=True)

    async def submit(self, spec: dict[str, Any]) -> tuple[str, bool]:
        run_id, run = self._new_run(spec)
        started = time.monotonic()
        cmd = commands.submit(new_id(), now_ms(), [{"id": run_id, **run.to_wire()}])
        result = await self._proposer.propose(cmd)
        self.metrics.commit_seconds.observe(time.monotonic() - started)
        outcome = result["runs"][0] if result.get("ok") else {"error": result.get("error")}
        if "error" in outcome:
            self.metrics.submissions.labels("rejected").inc()
            if outcome.get("code") == "tenant_queue_full":
                raise TooManyRequests(
                    f"{outcome['error']}; nothing was accepted: retry after the queue drains",
                    retry_after_s=self._retry_after_s(run.tenant),
                )
            raise BadRequest(f"submission rejected: {outcome['error']}")
        self.metrics.submissions.labels("created" if outcome["created"] else "existing").inc()
        if outcome["created"]:
            self._detach(self._record_submitted(run_id, run, now_ms()))
        return str(outcome["id"]), bool(outcome["created"])

    def _new_run(self, spec: dict[str, Any]) -> tuple[str, RunSpec]:
        """A new run id and the spec, from a validated request (absent and null
        fields take the spec's defaults)."""
        known = self.known_agents()
        if spec["agent"] not in known:
            raise UnknownAgentError(
                f"unknown agent {spec['agent']!r}: no peer of this mesh has it; "
                f"agents available: {', '.join(sorted(known))}"
            )
        try:
            self.registry.check_input(spec["agent"], spec["input"], self.settings.models)
        except InvalidInput as exc:
            raise BadRequest(str(exc)) from None
        try:
            return new_id(), RunSpec.from_wire(spec)
        except SpecError as exc:
            raise BadRequest(str(exc)) from None

    async def spawn(self, spec: dict[str, Any]) -> str:
        """A child run for ``ctx.spawn`` (runner.context.MeshLink): validated like a
        submission, and retried through outages, since the parent waits for it."""
        unknown = set(spec) - SUBMIT_FIELDS.keys() - {"parent_id", "depth"}
        if unknown:
            raise BadRequest(f"spawn: unknown options {', '.join(sorted(unknown))}")
        validate_submission({k: v for k, v in spec.items() if k in SUBMIT_FIELDS})
        while True:
            try:
                run_id, _ = await self.submit(spec)
                return run_id
            except Unavailable as exc:
                log.warning("spawn deferred: %s", exc.message, extra={"run_id": spec["parent_id"]})
                await asyncio.sleep(0.2)

    def _retry_after_s(self, tenant: str) -> int:
        """A hint, not a promise: time for the tenant's in-flight cap to take one
        more round of its queue at a nominal second per run, within 1..60 s."""
        with self._proposer.read() as state:
            queued = state.queued_for_tenant(tenant)
            cap = state.tenant_cap(tenant) or 1
        return max(1, min(60, -(-queued // max(1, cap))))

    async def _record_submitted(self, run_id: str, run: RunSpec, at_ms: int) -> None:
        """History for queued runs; best effort, since the owner's claim
        inserts the row anyway."""
        packed = dataclasses.replace(run, input=pack(run.input))
        row = RunRow(id=run_id, spec=packed, submitted_at_ms=at_ms)
        try:
            await self.store.record_runs([row])
        except Exception as exc:  # history is advisory here; the claim writes it for real
            log.warning("could not record run history: %s", exc, extra={"run_id": run_id})

    async def get_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        view, _ = await self._settled_view(run_id)
        if view is None:
            row = await from_storage(self.store.get_run(run_id))
            view = view_from_row(row) if row is not None else None
        if view is None or (tenant is not None and view["tenant"] != tenant):
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        return view

    async def _check_visible(self, run_id: str, tenant: str | None) -> None:
        """RunNotFound unless the run exists and belongs to ``tenant`` (None: any)."""
        if tenant is None:
            return
        with self._proposer.read() as state:
            active = state.runs.get(run_id)
            owner_tenant = active.tenant if active is not None else None
        if owner_tenant is None:
            row = await from_storage(self.store.get_run(run_id))
            owner_tenant = row.spec.tenant if row is not None else None
        if owner_tenant != tenant:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")

    async def list_runs(
        self, status: str | None, limit: int, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first. Under the state's lock only the page's runs are picked
        (by the fields a view sorts and filters on); views are built for those."""
        if status is not None and status not in ALL_STATUSES:
            raise BadRequest(
                f"unknown status {status!r}; use one of {', '.join(sorted(ALL_STATUSES))}"
            )
        with self._proposer.read() as state:
            now = now_ms()
            picked = heapq.nlargest(
                limit,
                (
                    r
                    for r in state.runs.values()
                    if (tenant is None or r.tenant == tenant)
                    and (status is None or listed_status(r) == status)
                ),
                key=lambda r: (r.submitted_at_ms, r.id),
            )
            active = [active_view(state, r, self.scheduler, now) for r in picked]
        stored: list[dict[str, Any]] = []
        if status is None or status in TERMINAL_STATUSES:
            rows = await from_storage(self.store.list_runs(status, limit, tenant))
            in_state = {v["id"] for v in active}
            with self._proposer.read() as state:
                in_state |= {r.id for r in rows if r.id in state.runs}
            stored = [view_from_row(r) for r in rows if r.id not in in_state]
        views = active + stored
        views.sort(key=lambda v: v["submitted_at"] or 0, reverse=True)
        return views[:limit]

    def follow_events(self, run_id: str, after_seq: int) -> AsyncIterator[Frame]:
        return self.events.follow(run_id, after_seq)

    def known_agents(self) -> set[str]:
        """Agents some up peer announced, and this peer's own."""
        with self._proposer.read() as state:
            peers = [p for p in state.peers.values() if p.status == PEER_UP]
            announced = {a for p in peers for a in p.agents or ()}
        return announced | set(self.registry.names())

    def agents(self) -> dict[str, Any]:
        return {"peer": self.id, "agents": self.registry.names()}

    async def cancel_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        """Queued runs end at once; a running one is stopped by its owner."""
        await self._check_visible(run_id, tenant)
        result = await self._proposer.propose(commands.cancel(new_id(), now_ms(), run_id))
        if result.get("ok"):
            status = "cancelled" if result["status"] == SETTLING else "cancelling"
            return {"id": run_id, "status": status}
        with self._proposer.read() as state:
            active = state.runs.get(run_id)
            view = view_from_state(active) if active is not None else None
        if view is not None:
            raise Conflict(f"run {run_id} cannot be cancelled: it is already {view['status']}")
        row = await from_storage(self.store.get_run(run_id))
        if row is None:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        raise Conflict(f"run {run_id} cannot be cancelled: it already {row.status}")

    async def retry_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        """Re-queue a dead letter under its own id. Storage is reopened first,
        then the run re-enters Raft state at its stored epoch, so its next
        owner claims epoch + 1. Calling again after a failure in between is
        safe: a reopened run that never made it back into Raft is re-submitted."""
        await self._check_visible(run_id, tenant)
        view, settling = await self._settled_view(run_id)
        if settling:
            raise Unavailable(f"run {run_id}'s outcome is still being recorded; retry shortly")
        if view is not None:
            raise Conflict(
                f"run {run_id} is {view['status']}; only failed or timed_out runs can be retried"
            )
        row = await from_storage(self.store.get_run(run_id))
        if row is None:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        if row.status in DEAD_LETTER_STATUSES:
            await from_storage(self.store.reopen(run_id))
            row = await from_storage(self.store.get_run(run_id))
        if row is None or row.status != QUEUED:
            status = row.status if row is not None else "gone"
            raise Conflict(
                f"run {run_id} is {status}; only failed or timed_out runs can be retried"
            )
        wire = resubmission(row)
        result = await self._proposer.propose(commands.submit(new_id(), now_ms(), [wire]))
        outcome = result["runs"][0] if result.get("ok") else {"error": result.get("error")}
        if "error" in outcome:
            if outcome.get("code") == "tenant_queue_full":
                raise TooManyRequests(
                    f"{outcome['error']}; retry after the queue drains",
                    retry_after_s=self._retry_after_s(row.spec.tenant),
                )
            raise Conflict(f"run {run_id} could not be re-queued: {outcome['error']}")
        log.info("dead letter re-queued", extra={"run_id": run_id, "epoch": row.epoch})
        return {"id": run_id, "status": QUEUED}

    async def _settled_view(self, run_id: str) -> tuple[dict[str, Any] | None, bool]:
        """The run's view while it is active (None once it has left the state),
        and whether it is still settling. An outcome the mesh decided but has
        not stored yet is waited out for up to the commit timeout, so that a
        terminal status comes with what storage knows of it (finished_at, the
        error); past that, the decided view is returned as it is."""
        deadline = time.monotonic() + self._proposer.commit_timeout_s
        while True:
            with self._proposer.read() as state:
                active = state.runs.get(run_id)
                if active is None:
                    return None, False
                settling = active.status == SETTLING
                if not settling or time.monotonic() >= deadline:
                    return active_view(state, active, self.scheduler, now_ms()), settling
            self._wake_leader()
            await asyncio.sleep(0.05)

    def cluster(self) -> dict[str, Any]:
        raft = self._proposer.raft
        leader_addr = raft.leader_addr
        now = now_ms()
        with self._proposer.read() as state:
            leader = state.peer_by_raft(leader_addr) if leader_addr else None
            peers = [
                {
                    "id": p.id,
                    "raft": p.raft,
                    "http": p.http,
                    "status": p.status,
                    "slots": p.slots,
                    "running": state.running_on(p.id),
                    "labels": p.labels,
                    "role": p.role,
                    "drain": p.drain or None,
                    "stopping": p.stopping,
                }
                for p in sorted(state.peers.values(), key=lambda p: p.id)
            ]
            queue = queue_summary(state, self.scheduler, now)
            slots = slot_use(state)
        return {
            "self": self.id,
            "leader": leader.id if leader else None,
            "term": raft.term,
            "voters": raft.voters(),
            "peers": peers,
            "queue": queue,
            "slots": slots,
            "placement": self.scheduler.placement,
        }

    async def readiness(self) -> tuple[bool, str]:
        raft = self._proposer.raft
        if raft.leader_addr is None:
            return False, "no known Raft leader"
        with self._proposer.read() as state:
            me = state.peers.get(self.id)
            registered = (
                me is not None and me.incarnation == self.incarnation and me.status == PEER_UP
            )
        if not registered:
            return False, "this peer has not joined the replicated membership yet"
        try:
            await self.store.ping()
        except StorageUnavailable as exc:
            return False, f"storage unreachable: {exc}"
        return True, "ok"

    def heartbeat(self, report: dict[str, Any]) -> None:
        if not self._proposer.raft.is_leader:
            raise NotLeader("this peer is not the leader")
        try:
            self.liveness.heard(str(report["id"]), str(report["incarnation"]), time.monotonic())
        except KeyError as exc:
            raise BadRequest(f"heartbeat lacks {exc}") from None

    def metrics_text(self) -> bytes:
        raft = self._proposer.raft
        self.metrics.is_leader.set(1 if raft.is_leader else 0)
        self.metrics.term.set(raft.term)
        self.metrics.running.set(self._busy())
        self.metrics.journal_syncs.set(raft.journal.syncs)
        with self._proposer.read() as state:
            queue = queue_summary(state, self.scheduler, now_ms())
            slots = slot_use(state)
        self.metrics.set_queue(queue, slots)
        return generate_latest(self.metrics.registry)


def resubmission(row: RunRow) -> dict[str, Any]:
    """A stored run as a ``submit`` entry again, exactly as it was submitted:
    every field of its spec, and the epoch and attempts storage knows, so its
    next owner claims epoch + 1 and its attempts keep counting."""
    spec = dataclasses.replace(row.spec, input=unpack(row.spec.input))
    return {"id": row.id, **spec.to_wire(), "epoch": row.epoch, "attempts": row.attempts}
