"""Prefetch with real peer processes: a peer holds runs ready beyond its slots,
runs no more than its slots at once, and gives a held run back when a slot
it could use is free on another peer (issue 12)."""

from __future__ import annotations

from typing import Any

import pytest
from support import MakeMesh, eventually, wait_all_terminal

from raftmesh.mesh.client import MeshClient

pytestmark = pytest.mark.slow


async def test_a_one_slot_peer_holds_the_prefetch_ready_and_runs_one_at_a_time(
    make_mesh: MakeMesh,
) -> None:
    mesh = await make_mesh("postgres", nodes=1, slots=1, env={"MESH_PREFETCH": "2"})
    client = MeshClient(mesh.peers[0].url, timeout_s=10)
    try:
        ids = [
            (await client.submit("steps", {"steps": 1, "step_seconds": 0.6}))["id"]
            for _ in range(4)
        ]

        async def held() -> bool:
            runs = [await client.get_run(i) for i in ids]
            owned = [r for r in runs if r["status"] == "running" and r["owner"] == "peer-1"]
            return len(owned) == 3

        await eventually(held, 10, "the one-slot peer holding its slot plus a prefetch of 2")
        runs = await wait_all_terminal(client, ids, timeout_s=30)
        assert {r["status"] for r in runs.values()} == {"succeeded"}
        spans = sorted((r["started_at"], r["finished_at"]) for r in runs.values())
        for (_, finished), (started, _) in zip(spans, spans[1:], strict=False):
            assert started >= finished, f"two runs shared one slot: {spans}"
        assert {r["attempts"] for r in runs.values()} == {1}, "each ran once"
    finally:
        await client.close()


async def test_a_run_held_behind_a_long_one_moves_to_a_peer_whose_slot_frees(
    make_mesh: MakeMesh,
) -> None:
    mesh = await make_mesh(
        "postgres",
        nodes=2,
        slots=1,
        env={"MESH_PREFETCH": "1"},
        peer_env={"peer-1": {"MESH_LABELS": "zone=a"}, "peer-2": {"MESH_LABELS": "zone=b"}},
    )
    client = MeshClient(mesh.peers[0].url, timeout_s=10)
    try:
        long = (
            await client.submit("steps", {"steps": 1, "step_seconds": 20}, labels={"zone": "a"})
        )["id"]
        short = (
            await client.submit("steps", {"steps": 1, "step_seconds": 1.5}, labels={"zone": "b"})
        )["id"]

        async def both_running() -> bool:
            runs = [await client.get_run(i) for i in (long, short)]
            return all(r["status"] == "running" for r in runs)

        await eventually(both_running, 10, "one run on each peer")
        # Both peers have one place left in the prefetch; the tie goes to peer-1,
        # behind the long run.
        held = (await client.submit("steps", {"steps": 1, "step_seconds": 0.1}))["id"]

        async def placed() -> dict[str, Any] | None:
            run = await client.get_run(held)
            return run if run["owner"] else None

        first = await eventually(placed, 5, "the third run placed")
        assert first["owner"] == "peer-1" and first["status"] == "running", first
        done = await wait_all_terminal(client, [held], timeout_s=12)
        assert done[held]["status"] == "succeeded"
        assert done[held]["owner"] == "peer-2", "it ran where a slot was free"
        assert (await client.get_run(long))["status"] == "running", "long before the long run ended"
    finally:
        await client.close()
