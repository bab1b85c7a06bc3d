"""Mesh-wide rate limits, measured where a provider would measure them: at the
stub model server. Three real peers share one limit of 60 requests per minute
through the leader's leases; 200 chat runs call the model at once; one peer
holding a lease is killed with SIGKILL and the others go on calling; then
the same with the leader, whose successor grants nothing for a lease period.
"""

from __future__ import annotations

import asyncio
import bisect
import re
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest
from chat_stub import MODEL, ChatStub
from support import MakeMesh, eventually

from raftmesh.mesh.client import MeshClient

pytestmark = pytest.mark.slow

LIMIT = 60
RUNS = 200
LEASE_S = 2.0
SLOTS = 70  # three peers hold all 200 runs at once


def most_in_a_minute(times: list[float]) -> int:
    """The most requests that arrived within any 60 seconds."""
    times = sorted(times)
    return max((bisect.bisect_left(times, t + 60) - i for i, t in enumerate(times)), default=0)


def admitted(metrics: str) -> float:
    """Calls this peer let through the limit (so it held a lease)."""
    found = re.search(
        r'^raftmesh_rate_limit_wait_seconds_count\{limit="stub"\} (\S+)$', metrics, re.M
    )
    return float(found.group(1)) if found else 0.0


async def limited_mesh(make_mesh: MakeMesh, stub: ChatStub) -> Any:
    env = {
        "MESH_CHAT_BASE_URL": stub.url,
        "MESH_CHAT_MODEL": MODEL,
        "MESH_CHAT_API_KEY": "stub-key",
        "MESH_CHAT_RATE_LIMIT": "stub",
        "MESH_RATE_LIMITS": f"stub={LIMIT}rpm",
        "MESH_RATE_LIMIT_LEASE_S": str(LEASE_S),
    }
    return await make_mesh("postgres", 3, slots=SLOTS, env=env)


async def test_sixty_a_minute_shared_by_three_peers_holds_at_the_server_across_a_kill(
    make_mesh: MakeMesh, stub: ChatStub
) -> None:
    mesh = await limited_mesh(make_mesh, stub)
    async with AsyncExitStack() as stack:
        clients = {
            p.id: await stack.enter_async_context(MeshClient(p.url, timeout_s=10))
            for p in mesh.peers
        }
        leader = await _saturate(clients, stub, RUNS)
        victim = next(p.id for p in mesh.peers if p.id != leader)
        await _kill_and_measure(mesh, victim, stub, resume_within_s=LEASE_S + 5)


async def test_a_new_leader_grants_only_after_the_old_leases_expired(
    make_mesh: MakeMesh, stub: ChatStub
) -> None:
    """The leader itself holds a lease too; its successor knows nothing of the
    leases it granted, so it waits one lease period before granting any."""
    mesh = await limited_mesh(make_mesh, stub)
    async with AsyncExitStack() as stack:
        clients = {
            p.id: await stack.enter_async_context(MeshClient(p.url, timeout_s=10))
            for p in mesh.peers
        }
        leader = await _saturate(clients, stub, RUNS // 2)
        # An election, a lease period of granting nothing, then fresh (empty) leases.
        await _kill_and_measure(mesh, leader, stub, resume_within_s=30)


async def _saturate(clients: dict[str, MeshClient], stub: ChatStub, runs: int) -> str:
    """``runs`` chat runs calling at once, every peer holding a lease, 30 s of
    limited calls behind them; the leader's id."""
    entry = clients["peer-1"]
    sem = asyncio.Semaphore(16)

    async def submit(i: int) -> None:
        prompt = {"prompt": f"run {i}: 6*7 and five words?", "tools": ["calculator", "word_count"]}
        async with sem:
            await entry.submit("chat", prompt, idempotency_key=f"rl-{i}")

    await asyncio.gather(*(submit(i) for i in range(runs)))

    async def all_running() -> bool:
        # A run's second call queues behind most others' first, so hardly any
        # is done yet; the done ones count too, so one cannot hide the rest.
        counts = [
            len((await entry.list_runs(status=status, limit=runs + 10))["runs"])
            for status in ("running", "succeeded")
        ]
        return sum(counts) == runs

    await eventually(all_running, 120, f"{runs} chat runs calling the model at once", poll_s=0.5)

    async def every_peer_admits() -> bool:
        texts = await asyncio.gather(*(c.metrics_text() for c in clients.values()))
        return all(admitted(text) > 0 for text in texts)

    await eventually(every_peer_admits, 60, "every peer to hold a lease and call", poll_s=0.5)
    first = stub.arrivals[0][0]
    # Past the start-up burst and well into the first minute before the kill.
    await eventually(
        lambda: _arrived_after(stub, first + 30), 120, "30 s of limited calls", poll_s=0.5
    )
    return str((await entry.cluster())["leader"])


async def _kill_and_measure(mesh: Any, victim: str, stub: ChatStub, resume_within_s: float) -> None:
    first = stub.arrivals[0][0]
    mesh.kill(victim)
    killed_at = time.monotonic()
    await eventually(
        lambda: _arrived_after(stub, killed_at), 60, "a call after the kill", poll_s=0.05
    )
    gap = min(t for t, _ in stub.arrivals if t > killed_at) - killed_at
    # A full minute after the kill, so windows span it on both sides.
    await eventually(
        lambda: _arrived_after(stub, killed_at + 65), 150, "a minute after the kill", poll_s=0.5
    )
    times = [t for t, _ in stub.arrivals]
    worst = most_in_a_minute(times)
    late = killed_at + resume_within_s + 5
    after = sum(1 for t in times if late <= t < killed_at + 65)
    print(
        f"\n{victim} killed; {len(times)} calls at the stub; most in any 60 s: {worst} "
        f"(limit {LIMIT}); first call {gap:.2f} s after the kill; {after} calls in the "
        f"{killed_at + 65 - late:.0f} s from {late - killed_at:.0f} s after it"
    )
    assert worst <= LIMIT, f"{worst} calls within 60 s"
    assert sum(1 for t in times if first <= t < first + 60) >= LIMIT // 2, "the limit was binding"
    assert gap <= resume_within_s, "the survivors kept calling"
    assert after > 0


async def _arrived_after(stub: ChatStub, at: float) -> bool:
    return any(t > at for t, _ in stub.arrivals)
