"""Membership and operations with real peer processes: join, leave, drain,
graceful SIGTERM and rolling restarts, voters and executors, guard rails.

Runs use ``probe_steps`` (tests/e2e/probe_agents.py), which writes a line
outside the mesh every time a step function starts, so "no step ran twice" is
checked against what really ran, not only against what was checkpointed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from probe_agents import read_witness
from support import eventually, submit_retrying, wait_all_terminal

from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh

pytestmark = pytest.mark.slow

E2E_DIR = Path(__file__).resolve().parent
GRACE_S = 5


def membership_env() -> dict[str, str]:
    return {
        "PYTHONPATH": str(E2E_DIR),
        "MESH_AGENT_MODULES": "probe_agents",
        "MESH_SHUTDOWN_GRACE_S": str(GRACE_S),
    }


async def mesh_cli(*args: str, timeout_s: float = 120) -> tuple[int, str, str]:
    """Run ``mesh ...`` as an operator's script would; (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "raftmesh.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Stream:
    """A steady stream of probe_steps runs, each submitted to a live peer in turn."""

    def __init__(self, mesh: DevMesh, witness: Path, steps: int = 4, step_s: float = 0.5) -> None:
        self.mesh = mesh
        self.input = {"steps": steps, "step_seconds": step_s, "log": str(witness)}
        self.ids: list[str] = []
        self.submitted_to: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._clients: dict[str, MeshClient] = {}

    def client(self, peer_id: str) -> MeshClient:
        if peer_id not in self._clients:
            self._clients[peer_id] = MeshClient(self.mesh.url(peer_id), timeout_s=10)
        return self._clients[peer_id]

    async def __aenter__(self) -> Stream:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await asyncio.gather(*(c.close() for c in self._clients.values()))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            live = [p for p in self.mesh.peers if p.running]
            target = live[n % len(live)]
            try:
                accepted = await submit_retrying(
                    self.client(target.id),
                    "probe_steps",
                    self.input,
                    timeout_s=20,
                    idempotency_key=f"s{n}",
                )
            except (AssertionError, OSError) as exc:
                # The target stopped under us: the same key goes to the next peer.
                accepted = await self._resubmit(n, exc)
            self.ids.append(accepted["id"])
            self.submitted_to[target.id] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.3)

    async def _resubmit(self, n: int, exc: BaseException) -> dict[str, Any]:
        for peer in itertools.cycle(self.mesh.peers):
            if peer.running:
                with contextlib.suppress(AssertionError, OSError):
                    return await submit_retrying(
                        self.client(peer.id),
                        "probe_steps",
                        self.input,
                        timeout_s=10,
                        idempotency_key=f"s{n}",
                    )
            await asyncio.sleep(0.2)
        raise AssertionError(f"submission {n} failed everywhere: {exc!r}")


def assert_each_step_ran_once(witness: Path, runs: dict[str, dict[str, Any]], steps: int) -> None:
    starts = Counter((r, i) for r, i, _, _, what in read_witness(str(witness)) if what == "start")
    for run_id, run in runs.items():
        assert run["status"] == "succeeded", (run["error"], run.get("failures"), run)
        assert [s["index"] for s in run["result"]["steps"]] == list(range(steps))
        for i in range(steps):
            assert starts[(run_id, i)] == 1, (
                f"run {run_id} step {i} started {starts[(run_id, i)]} times"
            )


async def cluster_of(client: MeshClient) -> dict[str, Any]:
    return await client.cluster()


def member(cluster: dict[str, Any], peer_id: str) -> dict[str, Any]:
    return next(p for p in cluster["peers"] if p["id"] == peer_id)


async def test_join_two_then_an_original_leaves_every_run_succeeds(make_mesh, tmp_path):
    mesh = await make_mesh("postgres", base_port=0, env=membership_env())
    witness = tmp_path / "witness"
    probe = MeshClient(mesh.url("peer-2"), timeout_s=10)
    try:
        async with Stream(mesh, witness) as stream:
            await eventually(lambda: asyncio.sleep(0, len(stream.ids) >= 3), 30, "first runs")
            joined = time.monotonic()
            p4 = mesh.join("peer-1")
            await mesh.wait_ready(60, ["peer-4"])
            ready_s = time.monotonic() - joined

            async def owns_runs(peer_id: str) -> bool:
                runs = [await probe.get_run(i) for i in stream.ids[-12:]]
                return any(r["owner"] == peer_id for r in runs)

            await eventually(lambda: owns_runs("peer-4"), 30, "peer-4 to take runs")
            mesh.join("peer-3", peer_id="peer-5")
            await mesh.wait_ready(60, ["peer-5"])
            await eventually(lambda: owns_runs("peer-5"), 30, "peer-5 to take runs")
            mesh.join("peer-2", role="executor", peer_id="peer-6")
            await mesh.wait_ready(60, ["peer-6"])
            await eventually(lambda: owns_runs("peer-6"), 30, "executor peer-6 to take runs")
            info = await probe.cluster()
            assert len(info["voters"]) == 5, "an executor does not vote"
            assert {p["id"]: p["status"] for p in info["peers"]} == {
                f"peer-{i}": "up" for i in range(1, 7)
            }
            assert member(info, "peer-6")["role"] == "executor"

            code, out, err = await mesh_cli("leave", "--peer", mesh.url("peer-1"))
            assert code == 0, err
            assert "peer-1 left the mesh" in out
            peer1 = mesh.peer("peer-1")
            assert peer1.process is not None
            assert await asyncio.to_thread(peer1.process.wait, 15) == 0
            await asyncio.sleep(2)
        ids = stream.ids
        runs = await wait_all_terminal(probe, ids, timeout_s=120)
        assert_each_step_ran_once(witness, runs, 4)
        info = await probe.cluster()
        assert member(info, "peer-1")["status"] == "left"
        assert mesh.peer("peer-1").raft not in info["voters"] and len(info["voters"]) == 4
        assert {r["owner"] for r in runs.values()} >= {"peer-4", "peer-5", "peer-6"}
        code, out, err = await mesh_cli("status", "--peer", mesh.url("peer-5"))
        assert code == 0, err
        rows = {line.split()[1]: line for line in out.splitlines() if "peer-" in line}
        assert "left" in rows["peer-1"] and "up" in rows["peer-5"] and "voter" in rows["peer-4"]

        # Membership survives restarts of the joined peer and of an original.
        mesh.restart("peer-4")
        mesh.restart("peer-2")
        mesh.restart("peer-6")
        await mesh.wait_ready(60, ["peer-2", "peer-4", "peer-6"])
        for peer_id in ("peer-2", "peer-4", "peer-6"):
            async with MeshClient(mesh.url(peer_id)) as c:
                again = await c.cluster()
                assert sorted(again["voters"]) == sorted(info["voters"]), peer_id
        after = [(await submit_retrying(probe, "echo", {"n": i}))["id"] for i in range(6)]
        done = await wait_all_terminal(probe, after, timeout_s=60)
        assert {r["status"] for r in done.values()} == {"succeeded"}
        print(f"\npeer-4 ready {ready_s:.1f}s after `mesh join`; {len(ids)} runs, all succeeded")
        assert p4.running
    finally:
        await probe.close()


async def test_rolling_restart_under_load_fails_nothing_and_repeats_no_step(make_mesh, tmp_path):
    mesh = await make_mesh("postgres", base_port=0, env=membership_env())
    witness = tmp_path / "witness"
    probe = MeshClient(mesh.url("peer-1"), timeout_s=10)
    stops: list[tuple[str, float, int]] = []
    try:
        async with Stream(mesh, witness) as stream:
            await eventually(lambda: asyncio.sleep(0, len(stream.ids) >= 6), 30, "runs in flight")
            for peer in list(mesh.peers):
                peer_probe = MeshClient(
                    next(p for p in mesh.peers if p is not peer).url, timeout_s=10
                )
                try:
                    sent = time.monotonic()
                    mesh.kill(peer.id, signal.SIGTERM)
                    assert peer.process is not None
                    code = await asyncio.to_thread(peer.process.wait, GRACE_S + 10)
                    stopped_s = time.monotonic() - sent
                    assert code == 0, f"{peer.id} exited {code} on SIGTERM"
                    assert "handed everything back" in peer.log_path.read_text()

                    # It owns nothing once its last commits are applied here:
                    # before the leader could judge it silent (peer_ttl_s 1.5 s,
                    # counted from its last heartbeat, i.e. its exit).
                    async def owns_nothing(
                        peer_id: str = peer.id, client: MeshClient = peer_probe
                    ) -> bool:
                        return member(await client.cluster(), peer_id)["running"] == 0

                    await eventually(owns_nothing, 1.0, f"{peer.id} to own nothing at exit")
                    stops.append((peer.id, stopped_s, 0))
                finally:
                    await peer_probe.close()
                mesh.restart(peer.id)
                await mesh.wait_ready(60, [peer.id])
            await asyncio.sleep(1)
        runs = await wait_all_terminal(probe, stream.ids, timeout_s=120)
        assert_each_step_ran_once(witness, runs, 4)
        handed_over = [r for r in runs.values() if r["epoch"] >= 2]
        assert handed_over, "the restarts should have moved some runs between peers"
        print(
            f"\n{len(runs)} runs, 0 failed, 0 repeated steps; {len(handed_over)} handed over; "
            + ", ".join(f"{p} stopped in {s:.1f}s" for p, s, _ in stops)
        )
    finally:
        await probe.close()


async def test_drain_release_undrain_and_guard_rails(make_mesh, tmp_path, open_mesh_store):
    mesh = await make_mesh("postgres", base_port=0, slots=2, env=membership_env())
    store = await open_mesh_store(mesh)
    witness = tmp_path / "witness"
    slow = {"steps": 10, "step_seconds": 0.4, "log": str(witness)}
    c1 = MeshClient(mesh.url("peer-1"), timeout_s=10)
    try:
        first = [(await c1.submit("probe_steps", slow))["id"] for _ in range(6)]

        async def progressed_on(peer_id: str) -> list[str] | None:
            runs = [await c1.get_run(i) for i in first]
            mine = [r["id"] for r in runs if r["status"] == "running" and r["owner"] == peer_id]
            done = [len(await store.load_steps(i)) for i in mine]
            return mine if mine and all(n >= 1 for n in done) else None

        on2 = await eventually(lambda: progressed_on("peer-2"), 30, "runs with progress on peer-2")
        on3 = await eventually(lambda: progressed_on("peer-3"), 30, "runs with progress on peer-3")

        # peer-2 first, so that runs released by peer-3 can only go to peer-1.
        assert (await c1.drain("peer-2"))["drain"] == "finish"
        code, out, err = await mesh_cli(
            "drain", "peer-3", "--release", "--peer", mesh.url("peer-1"), "--json"
        )
        assert code == 0 and '"drain": "release"' in out, (code, out, err)
        info = await c1.cluster()
        assert member(info, "peer-2")["drain"] == "finish"
        assert member(info, "peer-3")["drain"] == "release"
        later = [(await c1.submit("probe_steps", {**slow, "steps": 2}))["id"] for _ in range(4)]
        runs = await wait_all_terminal(c1, first + later, timeout_s=90)
        for run_id in on2:  # drained without --release: finished where they were
            assert (runs[run_id]["owner"], runs[run_id]["epoch"]) == ("peer-2", 1)
        for run_id in on3:  # released: checkpointed steps kept, the rest ran elsewhere
            steps = runs[run_id]["result"]["steps"]
            assert runs[run_id]["owner"] not in ("peer-2", "peer-3"), runs[run_id]
            assert runs[run_id]["owner"] not in ("peer-2", "peer-3") and runs[run_id]["epoch"] >= 2
            assert steps[0]["peer"] == "peer-3" and steps[-1]["peer"] == "peer-1"
        for run_id in later:
            assert runs[run_id]["owner"] == "peer-1", "a drained peer got new work"
        witnessed = read_witness(str(witness))
        assert_each_step_ran_once(witness, {i: runs[i] for i in first}, 10)
        assert not [w for w in witnessed if w[0] in later and w[2] != "peer-1"]

        code, out, err = await mesh_cli("undrain", "peer-2", "--peer", mesh.url("peer-3"))
        assert code == 0 and "peer-2 takes runs again" in out, (code, out, err)
        await c1.undrain("peer-3")
        again = [(await c1.submit("probe_steps", {**slow, "steps": 3}))["id"] for _ in range(6)]
        runs = await wait_all_terminal(c1, again, timeout_s=60)
        assert {r["owner"] for r in runs.values()} == {"peer-1", "peer-2", "peer-3"}

        # Guard rails: an id in use, a Raft address in use.
        free = mesh.peer("peer-2").raft
        code, out, err = await mesh_cli(
            "join",
            mesh.url("peer-1"),
            "--id",
            "peer-3",
            "--raft",
            "127.0.0.1:1",
            "--http",
            "127.0.0.1:2",
            "--data-dir",
            str(tmp_path / "dup"),
            "--storage",
            mesh.storage,
        )
        assert code == 1 and "409" in err and "'peer-3' is already in use" in err, (code, err)
        code, out, err = await mesh_cli(
            "join",
            mesh.url("peer-1"),
            "--id",
            "peer-9",
            "--raft",
            free,
            "--http",
            "127.0.0.1:2",
            "--data-dir",
            str(tmp_path / "dup2"),
            "--storage",
            mesh.storage,
        )
        assert code == 1 and f"raft address {free} is already used by peer 'peer-2'" in err, err
        # With peer-3 dead, removing another voter would leave 2 voters, 1 up.
        mesh.kill("peer-3")
        await eventually(lambda: _status_is(c1, "peer-3", "down"), 30, "peer-3 to be marked down")
        code, out, err = await mesh_cli("leave", "peer-2", "--peer", mesh.url("peer-1"))
        assert code == 1 and "could not form a majority" in err, (code, err)
        code, out, err = await mesh_cli("leave", "--peer", mesh.url("peer-1"))
        assert code == 1 and "could not form a majority" in err, (code, err)
        info = await c1.cluster()
        assert member(info, "peer-2")["drain"] is None and member(info, "peer-1")["drain"] is None
        assert len(info["voters"]) == 3 and mesh.peer("peer-1").running
        # Removing the dead voter itself is allowed: 2 voters remain, both up.
        code, out, err = await mesh_cli("leave", "peer-3", "--peer", mesh.url("peer-2"))
        assert code == 0 and "peer-3 left the mesh" in out, (code, err)
        info = await c1.cluster()
        assert len(info["voters"]) == 2 and member(info, "peer-3")["status"] == "left"
        done = await c1.wait((await c1.submit("echo", {"after": "guard rails"}))["id"], 30)
        assert done["status"] == "succeeded"
        # The leader itself may leave: it hands leadership over first.
        leader = info["leader"]
        stays = "peer-2" if leader == "peer-1" else "peer-1"
        code, out, err = await mesh_cli("leave", "--peer", mesh.url(leader))
        assert code == 0 and f"{leader} left the mesh" in out, (code, err)
        async with MeshClient(mesh.url(stays)) as remaining:
            info = await remaining.cluster()
            assert info["voters"] == [mesh.peer(stays).raft] and info["leader"] == stays
            done = await remaining.wait((await remaining.submit("echo", {"n": 1}))["id"], 30)
            assert done["status"] == "succeeded"
    finally:
        await c1.close()


async def _status_is(client: MeshClient, peer_id: str, status: str) -> bool:
    return member(await client.cluster(), peer_id)["status"] == status


async def test_three_voters_four_executors(make_mesh, tmp_path, open_mesh_store):
    mesh = await make_mesh(
        "postgres", nodes=7, executors=4, slots=2, base_port=0, env=membership_env()
    )
    store = await open_mesh_store(mesh)
    witness = tmp_path / "witness"
    work = {"steps": 6, "step_seconds": 0.4, "log": str(witness)}
    cs = {p.id: MeshClient(p.url, timeout_s=10) for p in mesh.peers}
    executors = [p.id for p in mesh.peers if p.role == "executor"]
    try:
        info = await cs["peer-7"].cluster()
        assert sorted(info["voters"]) == sorted(p.raft for p in mesh.peers[:3])
        roles = {p["id"]: p["role"] for p in info["peers"]}
        assert roles == {f"peer-{i}": "voter" if i <= 3 else "executor" for i in range(1, 8)}
        assert info["leader"] in ("peer-1", "peer-2", "peer-3")
        # Every peer, executors included, accepts submissions: 14 runs, 14 slots.
        ids = [(await cs[p].submit("probe_steps", work))["id"] for p in list(cs) * 2]

        async def all_running() -> dict[str, dict[str, Any]] | None:
            runs = {i: await cs["peer-1"].get_run(i) for i in ids}
            return runs if all(r["status"] == "running" for r in runs.values()) else None

        running = await eventually(all_running, 30, "14 runs on 14 slots")
        assert {r["owner"] for r in running.values()} == set(cs), "runs spread over all 7"

        async def victim_runs(peer_id: str) -> list[str] | None:
            mine = [i for i, r in running.items() if r["owner"] == peer_id]
            done = [len(await store.load_steps(i)) for i in mine]
            return mine if all(n >= 1 for n in done) else None

        victim = executors[0]
        moved = await eventually(lambda: victim_runs(victim), 30, f"progress on {victim}")
        mesh.kill(victim)
        leader = (await cs["peer-7"].cluster())["leader"]
        mesh.kill(leader)
        live = next(p for p in executors if p != victim)
        more = [
            (await submit_retrying(cs[live], "probe_steps", {**work, "steps": 2}))["id"]
            for _ in range(4)
        ]
        runs = await wait_all_terminal(cs[live], ids + more, timeout_s=120)
        assert {r["status"] for r in runs.values()} == {"succeeded"}
        for run_id in moved:
            steps = runs[run_id]["result"]["steps"]
            assert steps[0]["peer"] == victim and runs[run_id]["owner"] != victim
            assert runs[run_id]["epoch"] >= 2
        assert (await cs[live].cluster())["leader"] not in (None, leader)

        # The killed executor comes back with the same id: it must not start
        # the runs that were reassigned while it was away.
        restarted_at = time.time()
        mesh.restart(victim)
        await mesh.wait_ready(60, [victim])
        await asyncio.sleep(2)
        late = [
            w for w in read_witness(str(witness)) if w[2] == victim and w[0] in moved and w[3] >= 2
        ]
        assert not late, f"{victim} ran reassigned runs after its restart: {late}"
        log_text = mesh.peer(victim).log_path.read_text()
        restarted_log = log_text[log_text.rindex("starting " + victim) :]
        assert not [i for i in moved if i in restarted_log], (
            "the restarted executor touched its old runs"
        )
        final = [(await cs[victim].submit("echo", {"n": i}))["id"] for i in range(4)]
        finished = await wait_all_terminal(cs[victim], final, timeout_s=60)
        assert {r["status"] for r in finished.values()} == {"succeeded"}
        print(
            f"\n7 peers (3 voters), {len(ids) + len(more)} runs; restart checked at {restarted_at:.0f}"
        )
    finally:
        await asyncio.gather(*(c.close() for c in cs.values()))
