"""The core run path with real peer processes: submit anywhere, fail over, fence."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from typing import Any

import aiohttp
import pytest
from support import eventually, submit_retrying, wait_all_terminal

from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.mesh.devmesh import DevMesh
from raftmesh.runner.payload import unpack

pytestmark = pytest.mark.slow

STEPS = {"steps": 8, "step_seconds": 0.4}


def clients(mesh: DevMesh) -> dict[str, MeshClient]:
    return {p.id: MeshClient(p.url, timeout_s=10) for p in mesh.peers}


async def close_all(cs: dict[str, MeshClient]) -> None:
    await asyncio.gather(*(c.close() for c in cs.values()))


async def owners_with_progress(
    store: Any, runs: dict[str, dict[str, Any]], min_steps: int
) -> dict[str, list[str]]:
    """peer id → runs it owns that already checkpointed at least ``min_steps`` steps."""
    out: dict[str, list[str]] = {}
    for run_id, run in runs.items():
        if run["status"] == "running" and len(await store.load_steps(run_id)) >= min_steps:
            out.setdefault(run["owner"], []).append(run_id)
    return out


async def test_runs_submitted_to_any_peer_all_succeed(make_mesh, backend):
    mesh = await make_mesh(backend)
    cs = clients(mesh)
    try:
        rng = random.Random(7)
        targets = [rng.choice(list(cs)) for _ in range(50)]
        accepted = await asyncio.gather(
            *(cs[t].submit("steps", {"steps": 2, "step_seconds": 0.05}) for t in targets)
        )
        ids = [a["id"] for a in accepted]
        assert len(set(ids)) == 50
        assert {a["status"] for a in accepted} == {"queued"}
        assert {t for t in targets} == set(cs), "followers and the leader all took submissions"
        runs = await wait_all_terminal(cs["peer-1"], ids, timeout_s=90)
        assert {r["status"] for r in runs.values()} == {"succeeded"}
        for peer_id, client in cs.items():
            for run_id in ids:
                run = await client.get_run(run_id)
                assert run["status"] == "succeeded", (peer_id, run)
                assert len(run["result"]["steps"]) == 2
        owners = {r["owner"] for r in runs.values()}
        assert len(owners) >= 2, f"least-loaded placement should spread 50 runs, got {owners}"
    finally:
        await close_all(cs)


async def test_a_submitted_run_is_found_at_once_on_every_peer(make_mesh, backend):
    """Read where you did not write: once a submission is answered, every
    peer finds the run, even one whose replica has not applied the entry
    yet (it finds the stored row). Used to answer 404 now and then."""
    mesh = await make_mesh(backend)
    cs = clients(mesh)
    try:
        ids = list(cs)
        for i in range(60):
            writer = ids[i % len(ids)]
            run = await cs[writer].submit("echo", {"n": i})
            found = await asyncio.gather(
                *(c.get_run(run["id"]) for p, c in cs.items() if p != writer),
                return_exceptions=True,
            )
            missing = [f for f in found if isinstance(f, Exception)]
            assert not missing, (i, writer, missing)
    finally:
        await close_all(cs)


async def test_kill_owner_resumes_elsewhere_without_repeating_steps(
    make_mesh, backend, open_mesh_store
):
    mesh = await make_mesh(backend)
    store = await open_mesh_store(mesh)
    cs = clients(mesh)
    try:
        ids = [
            (await cs[p].submit("steps", STEPS))["id"] for p in ["peer-1", "peer-2", "peer-3"] * 2
        ]

        async def victim_with_progress() -> tuple[str, dict[str, int]] | None:
            runs = {i: await cs["peer-1"].get_run(i) for i in ids}
            progress = await owners_with_progress(store, runs, min_steps=2)
            if not progress:
                return None
            victim = max(progress, key=lambda p: len(progress[p]))
            return victim, {i: len(await store.load_steps(i)) for i in progress[victim]}

        victim, before = await eventually(victim_with_progress, 30, "runs with checkpointed steps")
        killed_at = time.time()
        mesh.kill(victim)
        survivor = next(c for p, c in cs.items() if p != victim)
        runs = await wait_all_terminal(survivor, ids, timeout_s=90)
        assert {r["status"] for r in runs.values()} == {"succeeded"}
        for run_id, done_before in before.items():
            run = runs[run_id]
            steps = run["result"]["steps"]
            assert [s["index"] for s in steps] == list(range(STEPS["steps"]))
            assert run["owner"] != victim and run["epoch"] >= 2
            # Steps checkpointed before the kill came back from the journal,
            # still naming the dead peer and epoch 1: they did not run again.
            assert all(s["peer"] == victim and s["epoch"] == 1 for s in steps[:done_before])
            resumed = [s for s in steps if s["epoch"] > 1]
            assert resumed and all(s["peer"] == run["owner"] for s in resumed)
            stored = await store.load_steps(run_id)
            assert [s.seq for s in stored] == list(range(STEPS["steps"]))
            assert all(s.epoch == 1 for s in stored[:done_before])
            assert all(s.at_ms // 1000 <= killed_at + 1 for s in stored if s.epoch == 1)
    finally:
        await close_all(cs)


async def test_paused_former_owner_cannot_write(make_mesh, open_mesh_store):
    mesh = await make_mesh("postgres")
    store = await open_mesh_store(mesh)
    cs = clients(mesh)
    try:
        ids = [
            (await cs[p].submit("steps", STEPS))["id"] for p in ["peer-1", "peer-2", "peer-3"] * 2
        ]

        async def paused_target() -> tuple[str, list[str]] | None:
            runs = {i: await cs["peer-1"].get_run(i) for i in ids}
            progress = await owners_with_progress(store, runs, min_steps=1)
            return max(progress.items(), key=lambda kv: len(kv[1])) if progress else None

        victim, victim_runs = await paused_target_or_fail(paused_target)
        mesh.kill(victim, signal.SIGSTOP)
        survivor = next(c for p, c in cs.items() if p != victim)

        async def reassigned() -> bool:
            runs = [await survivor.get_run(i) for i in victim_runs]
            return all(r["epoch"] >= 2 and r["owner"] != victim for r in runs)

        await eventually(reassigned, 30, "reassignment of the paused peer's runs")
        mesh.kill(victim, signal.SIGCONT)
        runs = await wait_all_terminal(survivor, ids, timeout_s=90)
        await asyncio.sleep(2)  # let the woken peer try whatever writes it had in flight
        assert {r["status"] for r in runs.values()} == {"succeeded"}
        for run_id in victim_runs:
            row = await store.get_run(run_id)
            assert row is not None and row.epoch >= 2 and row.owner != victim
            result = unpack(row.result)
            claim_ms = row.started_at_ms
            assert claim_ms is not None
            for stored in await store.load_steps(run_id):
                if stored.peer == victim:
                    assert stored.epoch == 1 and stored.at_ms <= claim_ms, (
                        "a write of the paused owner was accepted after the new claim"
                    )
            for event in await store.read_events(run_id):
                if event.epoch == 1:
                    assert event.at_ms <= claim_ms
            assert result["steps"][-1]["peer"] == row.owner, "the result is the new owner's"
    finally:
        await close_all(cs)


async def paused_target_or_fail(check: Any) -> Any:
    return await eventually(check, 30, "a peer owning runs with checkpointed steps")


async def test_kill_leader_elects_new_leader_and_loses_nothing(make_mesh):
    mesh = await make_mesh("postgres")
    cs = clients(mesh)
    try:
        before = [
            (await cs[p].submit("steps", {"steps": 4, "step_seconds": 0.3}))["id"] for p in cs
        ] * 1
        leader = (await cs["peer-1"].cluster())["leader"]
        assert leader in cs
        killed = time.monotonic()
        mesh.kill(leader)
        survivors = {p: c for p, c in cs.items() if p != leader}
        probe = next(iter(survivors.values()))

        async def new_leader() -> str | None:
            found = (await probe.cluster())["leader"]
            return found if found not in (None, leader) else None

        elected = await eventually(new_leader, 15, "a new leader")
        election_s = time.monotonic() - killed
        assert elected in survivors
        assert election_s < 15
        after = [
            (await submit_retrying(c, "echo", {"n": i}))["id"]
            for i, c in enumerate(survivors.values())
        ]
        runs = await wait_all_terminal(probe, before + after, timeout_s=90)
        assert {r["status"] for r in runs.values()} == {"succeeded"}
    finally:
        await close_all(cs)


async def test_full_restart_finishes_queued_and_running_runs(make_mesh):
    mesh = await make_mesh("postgres", slots=1)
    cs = clients(mesh)
    try:
        ids = [
            (await cs[p].submit("steps", {"steps": 6, "step_seconds": 0.3}))["id"]
            for p in list(cs) * 3
        ]

        async def some_running() -> bool:
            statuses = [(await cs["peer-1"].get_run(i))["status"] for i in ids]
            return statuses.count("running") == 3 and statuses.count("queued") >= 3

        await eventually(some_running, 30, "3 running and the rest queued")
        for peer in mesh.peers:
            mesh.kill(peer.id)
        for peer in mesh.peers:
            mesh.restart(peer.id)
        await mesh.wait_ready(timeout_s=60)
        runs = await wait_all_terminal(cs["peer-2"], ids, timeout_s=120)
        assert {r["status"] for r in runs.values()} == {"succeeded"}
        assert any(r["epoch"] >= 2 for r in runs.values()), (
            "runs interrupted by the restart resumed"
        )
    finally:
        await close_all(cs)


async def test_cut_off_leader_steps_down_and_refuses_submissions(make_mesh):
    """A leader that can reach no follower must stop acting as leader within
    seconds (pysyncobj's leaderFallbackTimeout), and a submission to it must
    get a 503 the client can retry instead of an acknowledgement it cannot back."""
    mesh = await make_mesh("sqlite")
    cs = clients(mesh)
    try:
        leader = (await cs["peer-1"].cluster())["leader"]
        followers = [p for p in cs if p != leader]
        for peer in followers:
            mesh.kill(peer, signal.SIGSTOP)
        cut = time.monotonic()

        async def stepped_down() -> bool:
            return (await cs[leader].cluster())["leader"] != leader

        await eventually(stepped_down, 20, "the cut-off leader to step down")
        stepped_down_s = time.monotonic() - cut
        with pytest.raises(MeshHTTPError) as refused:
            await cs[leader].submit("echo", {"cut": True})
        assert refused.value.status == 503
        assert not await cs[leader].readyz()
        for peer in followers:
            mesh.kill(peer, signal.SIGCONT)
        run = await submit_retrying(cs[leader], "echo", {"healed": True}, timeout_s=30)
        done = await wait_all_terminal(cs[followers[0]], [run["id"]], timeout_s=30)
        assert done[run["id"]]["status"] == "succeeded"
        print(f"cut-off leader stepped down after {stepped_down_s:.2f}s")
    finally:
        await close_all(cs)


async def test_peer_cut_off_from_the_leader_stops_its_runs_itself(make_mesh, open_mesh_store):
    """Self-fencing: the two other peers are frozen, so the third can reach no
    leader; within the TTL it stops writing steps on its own (storage fencing
    is the guarantee, this is the courtesy). Once the others wake up, its
    stopped runs are released and finish without repeating a step."""
    mesh = await make_mesh("sqlite", env={"MESH_PEER_TTL_S": "2.0"})
    store = await open_mesh_store(mesh)
    cs = clients(mesh)
    try:
        ids = [
            (await cs[p].submit("steps", {"steps": 40, "step_seconds": 0.3}))["id"]
            for p in list(cs) * 2
        ]

        async def busy_peer() -> str | None:
            runs = {i: await cs["peer-1"].get_run(i) for i in ids}
            progress = await owners_with_progress(store, runs, min_steps=1)
            return max(progress, key=lambda p: len(progress[p])) if progress else None

        isolated = await eventually(busy_peer, 30, "a peer running steps")
        mine = [i for i in ids if (await cs[isolated].get_run(i))["owner"] == isolated]
        others = [p for p in cs if p != isolated]
        for peer in others:
            mesh.kill(peer, signal.SIGSTOP)

        async def steps_by_isolated() -> int:
            count = 0
            for run_id in mine:
                count += sum(1 for s in await store.load_steps(run_id) if s.peer == isolated)
            return count

        await asyncio.sleep(2.0 * 0.75 + 2.0)  # past the self-fencing point, with margin
        settled = await steps_by_isolated()
        await asyncio.sleep(1.5)  # five more step times: a running attempt would write
        assert await steps_by_isolated() == settled, "a cut-off peer kept running its runs"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{mesh.url(isolated)}/metrics") as resp:
                metrics = await resp.text()
        fenced = [line for line in metrics.splitlines() if line.startswith("raftmesh_self_fenced")]
        assert fenced and float(fenced[0].split()[-1]) >= 1, fenced
        for peer in others:
            mesh.kill(peer, signal.SIGCONT)
        runs = await wait_all_terminal(cs[isolated], ids, timeout_s=120)
        assert {r["status"] for r in runs.values()} == {"succeeded"}
        for run_id in ids:
            indexes = [s.seq for s in await store.load_steps(run_id)]
            assert len(indexes) == len(set(indexes)) == 40, "a checkpointed step ran twice"
            assert [s["index"] for s in runs[run_id]["result"]["steps"]] == list(range(40))
    finally:
        await close_all(cs)
