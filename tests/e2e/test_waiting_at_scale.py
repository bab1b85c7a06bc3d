"""A thousand runs waiting for a person cost no slot (issue 11, point 3).

3 peers of 2 slots each, 1,000 ``approval`` runs submitted and all waiting for
their ``decision`` signal; 50 ``echo`` runs submitted afterwards all succeed
meanwhile, while the committed state is sampled again and again: a waiting
run never holds a slot or has an owner. Then each approval gets its own
decision and succeeds with exactly that data. Run with ``-s`` for the figures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from support import eventually, submit_retrying

from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh

pytestmark = pytest.mark.slow

APPROVALS = 1000
ECHOES = 50
SLOTS = 2
IN_FLIGHT = 32


async def bounded(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Every call, at most IN_FLIGHT at a time, results in order."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


async def leader_client(clients: dict[str, MeshClient]) -> MeshClient:
    async def found() -> MeshClient | None:
        leader = (await next(iter(clients.values())).cluster())["leader"]
        return clients.get(leader) if leader else None

    return await eventually(found, 30, "a leader")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sample(clients: dict[str, MeshClient], waiting_ids: set[str]) -> int:
    """One look at the committed state while the approvals wait: the slots in
    use (all of them by echo runs), after checking that no waiting run has
    one or an owner."""
    leader = await leader_client(clients)
    cluster = await leader.cluster()
    used = sum(p["running"] for p in cluster["peers"])
    assert used == cluster["runs"]["running"] <= SLOTS * len(clients), cluster
    assert cluster["runs"]["waiting"] == APPROVALS, cluster["runs"]
    waiting = (await leader.list_runs(status="waiting", limit=10_000))["runs"]
    assert {r["id"] for r in waiting} == waiting_ids
    assert all(r["owner"] is None for r in waiting), [r for r in waiting if r["owner"]][:3]
    running = (await leader.list_runs(status="running", limit=10_000))["runs"]
    assert all(r["agent"] == "echo" and r["owner"] for r in running), running
    return used


async def test_a_thousand_waiting_approvals_hold_no_slot(make_mesh, backend: str) -> None:
    mesh: DevMesh = await make_mesh(backend, slots=SLOTS)
    clients = {p.id: MeshClient(p.url, timeout_s=30) for p in mesh.peers}
    by_index = list(clients.values())
    try:
        started = time.monotonic()
        submitted = await bounded(
            [
                lambda i=i: submit_retrying(
                    by_index[i % len(by_index)],
                    "approval",
                    {"prompt": {"n": i}},
                    idempotency_key=f"approval-{i}",
                )
                for i in range(APPROVALS)
            ]
        )
        ids = [s["id"] for s in submitted]
        submit_s = time.monotonic() - started

        async def all_waiting() -> bool:
            cluster = await (await leader_client(clients)).cluster()
            return bool(cluster["runs"]["waiting"] == APPROVALS)

        await eventually(all_waiting, 300, f"{APPROVALS} runs to wait", poll_s=0.5)
        waiting_s = time.monotonic() - started

        used = [await sample(clients, set(ids))]
        echoes = await bounded(
            [
                lambda i=i: submit_retrying(
                    by_index[i % len(by_index)], "echo", {"e": i}, idempotency_key=f"echo-{i}"
                )
                for i in range(ECHOES)
            ]
        )
        echo_ids = {e["id"] for e in echoes}

        async def echoes_done() -> bool:
            used.append(await sample(clients, set(ids)))
            views = (await by_index[0].list_runs(agent="echo", limit=10_000))["runs"]
            ended = {v["id"]: v for v in views if v["id"] in echo_ids}
            assert all(v["status"] in ("queued", "running", "succeeded") for v in ended.values())
            return len(ended) == ECHOES and all(v["status"] == "succeeded" for v in ended.values())

        await eventually(echoes_done, 120, f"{ECHOES} echo runs to succeed", poll_s=0.3)
        used.append(await sample(clients, set(ids)))

        sent_at: dict[str, float] = {}

        async def decide(i: int) -> None:
            sent_at[ids[i]] = time.time()
            await by_index[i % len(by_index)].signal(
                ids[i], "decision", {"approve": True, "n": i}, idempotency_key=f"decision-{i}"
            )

        signalled = time.monotonic()
        await bounded([lambda i=i: decide(i) for i in range(APPROVALS)])
        signal_s = time.monotonic() - signalled

        async def all_succeeded() -> list[dict[str, Any]] | None:
            views = (await by_index[1].list_runs(agent="approval", limit=10_000))["runs"]
            assert not [v for v in views if v["status"] in ("failed", "timed_out")], views
            done = [v for v in views if v["status"] == "succeeded"]
            return done if len(done) == APPROVALS else None

        done = await eventually(all_succeeded, 300, f"{APPROVALS} approvals to succeed", 0.5)
        finish_s = time.monotonic() - signalled
        results = {v["id"]: v["result"] for v in done}
        assert results == {run_id: {"approve": True, "n": i} for i, run_id in enumerate(ids)}
        latency = [v["finished_at"] - sent_at[v["id"]] for v in done]
        print(
            f"\n[{backend}] {APPROVALS} approvals on {len(clients)} peers x {SLOTS} slots: "
            f"submitted in {submit_s:.1f}s, all waiting after {waiting_s:.1f}s; "
            f"slots used while they waited (by {ECHOES} echo runs): max {max(used)} "
            f"over {len(used)} samples, by waiting runs: 0; "
            f"{APPROVALS} signals sent in {signal_s:.1f}s, all succeeded after {finish_s:.1f}s "
            f"({APPROVALS / finish_s:.0f} resumed runs/s through {SLOTS * len(clients)} slots); "
            f"signal->finish p50 {quantile(latency, 0.5):.2f}s p99 {quantile(latency, 0.99):.2f}s"
        )
    finally:
        for client in clients.values():
            await client.close()
