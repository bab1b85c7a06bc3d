"""Figures for issue 11: how soon a signal resumes a suspended run, and the
slots that runs waiting for signals use (none). Real peers, real PostgreSQL,
real HTTP.

Latency is from the signal's 202 (the signal is committed) to the run's next
step, whose function records ``time.time()`` in the peer that resumed it; both
clocks are this machine's wall clock. It is printed, not asserted (it measures
the machine as much as the mesh); asserted is that each run resumed with its
own signal's data, and not before the signal was sent.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from probe_agents import wall_ms
from support import eventually, submit_retrying, wait_all_terminal

from raftmesh.bench.mesh import median, percentile
from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh

pytestmark = pytest.mark.slow

E2E_DIR = Path(__file__).resolve().parent
PROBES = {"PYTHONPATH": str(E2E_DIR), "MESH_AGENT_MODULES": "probe_agents"}

RUNS = 200
IN_FLIGHT = 20


async def test_signal_to_resume_latency_and_slots_while_waiting(make_mesh) -> None:
    """``RUNS`` runs wait for a signal; they hold no slot. Then one signal at a
    time, each sent once the previous one's 202 came back, through the peers
    in turn (followers forward to the leader)."""
    mesh: DevMesh = await make_mesh("postgres", env=PROBES)
    clients = [MeshClient(p.url, timeout_s=10) for p in mesh.peers]
    try:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def submit(i: int) -> str:
            async with gate:
                run = await submit_retrying(
                    clients[i % len(clients)], "probe_signalled", None, idempotency_key=f"sig-{i}"
                )
                return str(run["id"])

        ids = await asyncio.gather(*(submit(i) for i in range(RUNS)))

        async def all_waiting() -> dict[str, Any] | None:
            cluster = await clients[0].cluster()
            return cluster if cluster["runs"]["waiting"] == RUNS else None

        cluster = await eventually(all_waiting, 120, f"{RUNS} runs to wait for their signal")
        slots = sum(p["slots"] for p in cluster["peers"])
        used = sum(p["running"] for p in cluster["peers"])
        assert used == 0, cluster
        views = [await clients[1].get_run(run_id) for run_id in ids]
        assert {(v["status"], v["owner"]) for v in views} == {("waiting", None)}

        sent_ms: dict[str, int] = {}
        acked_ms: dict[str, int] = {}
        for i, run_id in enumerate(ids):
            sent_ms[run_id] = wall_ms()
            answer = await clients[i % len(clients)].signal(run_id, "go", {"n": i})
            acked_ms[run_id] = wall_ms()
            assert (answer["seq"], answer["duplicate"]) == (0, False), answer
        runs = await wait_all_terminal(clients[0], ids, timeout_s=120)
    finally:
        for client in clients:
            await client.close()
    assert {r["status"] for r in runs.values()} == {"succeeded"}
    from_ack, from_send = [], []
    for i, run_id in enumerate(ids):
        result = runs[run_id]["result"]
        assert result["data"] == {"n": i}, result
        assert result["woke_ms"] >= sent_ms[run_id], "resumed before its signal was sent"
        from_ack.append(result["woke_ms"] - acked_ms[run_id])
        from_send.append(result["woke_ms"] - sent_ms[run_id])
    ack_ms = [acked_ms[r] - sent_ms[r] for r in ids]
    print(
        f"\nslots in use while {RUNS} runs waited for a signal: {used} of {slots}"
        f"\nsignal 202 -> next step, {RUNS} signals one at a time: p50 {median(from_ack):.0f} ms, "
        f"p99 {percentile(from_ack, 99):.0f} ms, max {max(from_ack):.0f} ms, "
        f"min {min(from_ack):.0f} ms"
        f"\nsignal sent -> next step: p50 {median(from_send):.0f} ms, "
        f"p99 {percentile(from_send, 99):.0f} ms; sent -> 202: p50 {median(ack_ms):.0f} ms, "
        f"p99 {percentile(ack_ms, 99):.0f} ms; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
