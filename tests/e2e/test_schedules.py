"""Replicated schedules end to end (issue 11, point 5): real peers, real
PostgreSQL, real HTTP.

The must-show: a 2-second schedule through 3 kill -9s of the leader over about
a minute fires every tick exactly once. Each fired tick's run is counted in
storage by its idempotency key (``schedule:{id}:{tick_ms}``): none twice, and
under catchup "all" none missed from the first tick to the last, even across 5 s
without a majority at the end; under catchup "one" the ticks passed over all
fell due while no leader could fire them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import pytest
from click.testing import CliRunner
from support import eventually

from raftmesh.chaos.secure import make_secure_setup
from raftmesh.cli.main import main
from raftmesh.consensus.schedules import tick_key
from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.mesh.devmesh import DevMesh
from raftmesh.storage import Store
from raftmesh.storage.base import RunRow

pytestmark = pytest.mark.slow

EVERY_MS = 2000


def clients(
    mesh: DevMesh, token: str | None = None, ca: str | None = None
) -> dict[str, MeshClient]:
    return {p.id: MeshClient(p.url, token, timeout_s=10, ca=ca) for p in mesh.peers}


async def close_all(cs: dict[str, MeshClient]) -> None:
    for c in cs.values():
        await c.close()


async def stored_runs(store: Store, schedule_id: str, agent: str = "echo") -> list[RunRow]:
    rows = await store.list_runs(None, 10_000, agent=agent)
    prefix = f"schedule:{schedule_id}:"
    return [r for r in rows if r.spec.idempotency_key and r.spec.idempotency_key.startswith(prefix)]


async def stored_ticks(store: Store, schedule_id: str) -> Counter[str]:
    """Runs in storage per tick key of ``schedule_id``."""
    return Counter(str(r.spec.idempotency_key) for r in await stored_runs(store, schedule_id))


def lateness_line(rows: list[RunRow]) -> str:
    """How long after its tick each run was fired (the leader's clock when it
    proposed the tick, which is the run's submitted_at): a figure, not a check."""
    late = sorted(
        r.submitted_at_ms - int(str(r.spec.idempotency_key).rsplit(":", 1)[1]) for r in rows
    )

    def at(q: float) -> int:
        return late[min(len(late) - 1, int(q * len(late)))]

    return f"{len(late)} ticks fired late by p50 {at(0.5)} ms, p99 {at(0.99)} ms, max {late[-1]} ms"


async def test_a_2s_schedule_fires_every_tick_once_through_3_leader_kills(
    make_mesh: Any, open_mesh_store: Any
) -> None:
    mesh = await make_mesh("postgres")
    cs = clients(mesh)
    store = await open_mesh_store(mesh)
    try:
        first = cs["peer-1"]
        # every_s under catchup "all": every tick, missed or not, fires.
        every = await first.add_schedule(
            "every-2s", "echo", {"tick": True}, every_s=2, overlap="allow", catchup="all"
        )
        # The same 2 s as a seconds-level cron under catchup "one".
        cron = await first.add_schedule(
            "cron-2s", "echo", {"cron": True}, cron="* * * * * */2", catchup="one", overlap="allow"
        )
        assert every["every_s"] == 2 and cron["cron"] == "* * * * * */2"
        assert every["next_tick_at"] is not None
        created_ms = int(every["created_at"] * 1000)
        started = time.monotonic()

        async def fired(minimum: int) -> int | None:
            # any peer answers, whichever leads or is down
            for c in cs.values():
                try:
                    view = await c.schedule("every-2s")
                except (MeshHTTPError, OSError):
                    continue
                return view["fired"] if view["fired"] >= minimum else None
            return None

        def wall_ms() -> int:
            return int(time.time() * 1000)

        # (from, to) wall times in which no leader could fire: a tick the
        # catch-up policy "one" passes over must fall due in one of them.
        outages: list[tuple[int, int]] = []
        kills = []
        for _ in range(3):
            before = await eventually(lambda: fired(1), 60, "the schedule to fire")
            await eventually(lambda b=before: fired(b + 3), 60, "three more ticks")
            leader = await eventually(lambda: _leader(cs), 30, "a leader")
            # Just before a tick is due, so the election spans it: the new
            # leader must fire it late, and fire it once.
            upcoming = await eventually(lambda: _next_tick(cs), 30, "the next tick's time")
            await asyncio.sleep(max(0.0, upcoming - 0.3 - time.time()))
            at_kill = await eventually(lambda: fired(1), 30, "the schedule's count")
            killed_ms = wall_ms()
            mesh.kill(leader)
            kills.append(leader)
            survivors = {p: c for p, c in cs.items() if p != leader}
            await eventually(
                lambda s=survivors, old=leader: _leader(s, not_=old), 30, "a new leader"
            )
            await eventually(lambda n=at_kill: fired(n + 1), 30, "a tick under the new leader")
            outages.append((killed_ms, wall_ms()))
            mesh.restart(leader)
            await mesh.wait_ready(timeout_s=60)
        # Then no majority for more than two periods (two of three peers
        # down): "all" fires every tick it missed, "one" only the latest.
        leader = await eventually(lambda: _leader(cs), 30, "a leader")
        second = next(p for p in cs if p != leader)
        at_kill = await eventually(lambda: fired(1), 30, "the schedule's count")
        killed_ms = wall_ms()
        mesh.kill(leader)
        mesh.kill(second)
        await asyncio.sleep(5.0)  # the outage itself, not a wait for something
        mesh.restart(leader)
        mesh.restart(second)
        await mesh.wait_ready(timeout_s=60)
        await eventually(lambda n=at_kill: fired(n + 1), 60, "a tick after the outage")
        outages.append((killed_ms, wall_ms()))
        # about a minute in all, then a few more ticks under the last leader
        while time.monotonic() - started < 60:
            await eventually(lambda: fired(1), 30, "the schedule to fire")
            await asyncio.sleep(1.0)
        now_fired = await eventually(lambda: fired(1), 30, "the schedule to fire")
        await eventually(lambda: fired(now_fired + 2), 30, "two more ticks")
        for schedule_id in ("every-2s", "cron-2s"):
            await first.pause_schedule(schedule_id)
        paused_at_ms = int(time.time() * 1000)
        views = {s["id"]: s for s in (await first.schedules())["schedules"]}
        assert all(v["paused"] for v in views.values())

        # Every fired tick's run reaches storage (its owner's claim writes it).
        async def all_stored(schedule_id: str) -> Counter[str] | None:
            ticks = await stored_ticks(store, schedule_id)
            return ticks if sum(ticks.values()) >= views[schedule_id]["fired"] else None

        every_runs = await eventually(lambda: all_stored("every-2s"), 90, "every-2s runs stored")
        cron_runs = await eventually(lambda: all_stored("cron-2s"), 90, "cron-2s runs stored")

        # None twice.
        assert max(every_runs.values()) == 1, every_runs.most_common(3)
        assert max(cron_runs.values()) == 1, cron_runs.most_common(3)
        # None missed (catchup "all"): every 2 s point from the first after
        # creation to the last tick, and the last is recent.
        last_ms = int(views["every-2s"]["last_tick_at"] * 1000)
        first_ms = (created_ms // EVERY_MS + 1) * EVERY_MS
        expected = {tick_key("every-2s", t) for t in range(first_ms, last_ms + 1, EVERY_MS)}
        assert set(every_runs) == expected, (
            f"missing {sorted(expected - set(every_runs))[:5]}, "
            f"extra {sorted(set(every_runs) - expected)[:5]}"
        )
        assert views["every-2s"]["fired"] == len(expected) >= 25
        assert views["every-2s"]["skipped"] == 0
        assert paused_at_ms - last_ms < 10_000
        # catchup "one": on the 2 s grid, each tick once; the ticks passed
        # over fell due while no leader could fire them, and the quorum
        # outage made it pass over some.
        cron_ticks = sorted(int(k.rsplit(":", 1)[1]) for k in cron_runs)
        assert all(t % EVERY_MS == 0 for t in cron_ticks)
        assert len(cron_ticks) == views["cron-2s"]["fired"] >= 15
        cron_first = (int(views["cron-2s"]["created_at"] * 1000) // EVERY_MS + 1) * EVERY_MS
        cron_last = int(views["cron-2s"]["last_tick_at"] * 1000)
        assert cron_ticks[-1] == cron_last
        passed_over = sorted(set(range(cron_first, cron_last + 1, EVERY_MS)) - set(cron_ticks))
        assert passed_over, "the 5 s without a majority passed over a tick under catchup one"
        for tick in passed_over:
            assert any(start - EVERY_MS <= tick <= end for start, end in outages), (
                tick,
                outages,
            )
        assert len(kills) == 3
        print("every-2s (catchup all):", lateness_line(await stored_runs(store, "every-2s")))
        print("cron-2s (catchup one):", lateness_line(await stored_runs(store, "cron-2s")))
        print(f"cron-2s passed over {len(passed_over)} ticks; outages (ms): ", end="")
        print([end - start for start, end in outages])
    finally:
        await close_all(cs)


async def _next_tick(cs: dict[str, MeshClient]) -> float | None:
    for c in cs.values():
        try:
            return float((await c.schedule("every-2s"))["next_tick_at"])
        except (MeshHTTPError, OSError):
            continue
    return None


async def _leader(cs: dict[str, MeshClient], not_: str | None = None) -> str | None:
    for c in cs.values():
        try:
            found = (await c.cluster())["leader"]
        except (MeshHTTPError, OSError):
            continue
        if found is not None and found != not_ and found in cs:
            return str(found)
    return None


async def _status(call: Any) -> tuple[int, str]:
    try:
        await call
    except MeshHTTPError as exc:
        return exc.status, exc.code
    return 200, "ok"


async def test_schedule_api_errors_and_tenants(make_mesh: Any, tmp_path: Any) -> None:
    setup = make_secure_setup(tmp_path / "secure")
    mesh = await make_mesh("postgres", env=setup.peer_env())
    urls = [p.url for p in mesh.peers]
    ca = str(setup.ca)
    admin = MeshClient(urls[0], setup.admin_token, ca=ca)
    alpha = MeshClient(urls[1], setup.tenant_tokens["alpha"], ca=ca)
    beta = MeshClient(urls[2], setup.tenant_tokens["beta"], ca=ca)
    try:
        bad = [
            admin.add_schedule("x", "echo", 1, cron="61 * * * *"),
            admin.add_schedule("x", "echo", 1, cron="every day"),
            admin.add_schedule("x", "echo", 1, every_s=5, timezone="Mars/Olympus"),
            admin.add_schedule("x", "echo", 1, cron="* * * * *", every_s=5),
            admin.add_schedule("x", "echo", 1),
            admin.add_schedule("x", "echo", 1, every_s=0.1),
            admin.add_schedule("x/y", "echo", 1, every_s=5),
            admin.add_schedule("x", "echo", 1, every_s=5, overlap="sometimes"),
            admin.add_schedule("x", "no-such-agent", 1, every_s=5),
            admin.add_schedule("x", "echo", "x" * 70_000, every_s=5),
        ]
        for call in bad:
            status, code = await _status(call)
            assert status == 400, code
        assert (await _status(admin.add_schedule("x", "no-such-agent", 1, every_s=5)))[1] == (
            "unknown_agent"
        )
        for call in (
            admin.schedule("nope"),
            admin.delete_schedule("nope"),
            admin.pause_schedule("nope"),
            admin.resume_schedule("nope"),
        ):
            assert await _status(call) == (404, "schedule_not_found")

        made = await alpha.add_schedule("nightly", "echo", {"n": 1}, cron="0 3 * * *")
        assert made["tenant"] == "alpha" and made["timezone"] == "UTC"
        assert made["overlap"] == "skip" and made["catchup"] == "none"
        # a minute-level cron is checked for its next time only
        assert made["next_tick_at"] % 86400 == 3 * 3600
        again = await alpha.add_schedule("nightly", "echo", {"n": 1}, cron="0 3 * * *")
        assert again["created_at"] == made["created_at"]
        assert await _status(alpha.add_schedule("nightly", "echo", {"n": 2}, cron="0 3 * * *")) == (
            409,
            "conflict",
        )
        # tenant rules as for runs
        assert (await _status(beta.add_schedule("b", "echo", 1, every_s=60, tenant="alpha")))[
            0
        ] == 403
        assert (await beta.schedules())["schedules"] == []
        for call in (
            beta.schedule("nightly"),
            beta.pause_schedule("nightly"),
            beta.delete_schedule("nightly"),
        ):
            assert (await _status(call))[0] == 404
        assert [s["id"] for s in (await admin.schedules())["schedules"]] == ["nightly"]

        paused = await alpha.pause_schedule("nightly")
        assert paused["paused"] and paused["next_tick_at"] is None
        assert not (await alpha.resume_schedule("nightly"))["paused"]
        assert (await alpha.delete_schedule("nightly"))["id"] == "nightly"
        assert await _status(alpha.schedule("nightly")) == (404, "schedule_not_found")

        # the command line, as an operator types it
        async def mesh_cli(*args: str) -> Any:
            argv = ["--ca", ca, "schedule", *args, "--peer", urls[0]]
            env = {"MESH_API_TOKEN": setup.admin_token}
            result = await asyncio.to_thread(CliRunner().invoke, main, argv, env=env)
            assert result.exit_code == 0, result.output
            return result.output

        added = json.loads(await mesh_cli("add", "cli-1", "--agent", "echo", "--every", "60"))
        assert added["every_s"] == 60 and added["tenant"] == "default"
        listed = json.loads(await mesh_cli("ls", "--json"))
        assert [s["id"] for s in listed["schedules"]] == ["cli-1"]
        assert "cli-1" in await mesh_cli("ls")
        assert json.loads(await mesh_cli("pause", "cli-1"))["paused"] is True
        assert json.loads(await mesh_cli("resume", "cli-1"))["paused"] is False
        assert json.loads(await mesh_cli("rm", "cli-1"))["id"] == "cli-1"
        assert (await admin.schedules())["schedules"] == []

        doc = await admin._request("GET", "/v1/openapi.json")
        assert {"get", "post"} <= set(doc["paths"]["/v1/schedules"])
        assert "ScheduleRequest" in doc["components"]["schemas"]
    finally:
        for c in (admin, alpha, beta):
            await c.close()


async def test_overlap_skip_and_cancel_previous_on_real_runs(
    make_mesh: Any, open_mesh_store: Any
) -> None:
    """Runs longer than the period: "skip" drops the ticks while its run is
    active, "cancel_previous" cancels the running run (its owner stops it)
    and starts the next."""
    mesh = await make_mesh("postgres")
    cs = clients(mesh)
    store = await open_mesh_store(mesh)
    try:
        client = cs["peer-2"]
        long_run = {"steps": 40, "step_seconds": 0.25}
        await client.add_schedule("skip", "steps", long_run, every_s=2, overlap="skip")
        await client.add_schedule(
            "cancel", "steps", long_run, every_s=2, overlap="cancel_previous", catchup="all"
        )

        async def ticked(schedule_id: str, fired: int, skipped: int = 0) -> dict[str, Any] | None:
            view = await client.schedule(schedule_id)
            return view if view["fired"] >= fired and view["skipped"] >= skipped else None

        skip = await eventually(lambda: ticked("skip", 1, skipped=2), 60, "two skipped ticks")
        assert skip["fired"] == 1, skip
        first = skip["last_run"]
        assert (await client.get_run(first))["status"] in ("queued", "running")

        cancel = await eventually(lambda: ticked("cancel", 3), 60, "three cancel ticks")
        for schedule_id in ("skip", "cancel"):
            await client.pause_schedule(schedule_id)
        final = await client.schedule("cancel")

        async def all_stored() -> list[RunRow] | None:
            rows = await stored_runs(store, "cancel", agent="steps")
            return rows if len(rows) >= final["fired"] else None

        rows = await eventually(all_stored, 60, "every cancel run in storage")
        runs = [r for r in rows if r.id != final["last_run"]]

        async def ended(run_id: str) -> dict[str, Any] | None:
            run = await client.get_run(run_id)
            return run if run["status"] in ("cancelled", "succeeded", "failed") else None

        previous = [await eventually(lambda i=r.id: ended(i), 60, "a cancelled run") for r in runs]
        assert previous and {r["status"] for r in previous} == {"cancelled"}, previous
        assert cancel["skipped"] == 0
    finally:
        await close_all(cs)
