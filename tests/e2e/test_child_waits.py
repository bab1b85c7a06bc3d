"""A parent waiting for its children leaves its slot (issue 11), end to end:
real peers with one slot each, real PostgreSQL, real HTTP.

Before suspension a tree deeper than the mesh has slots stalled: every slot
held a parent waiting for children that had no slot to run in. Runs use the
agents of tests/e2e/probe_agents.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import eventually, wait_all_terminal

from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh

pytestmark = pytest.mark.slow

E2E_DIR = Path(__file__).resolve().parent
PROBES = {"PYTHONPATH": str(E2E_DIR), "MESH_AGENT_MODULES": "probe_agents"}

DEPTH, FANOUT = 3, 3
# Long enough leaves that the tree is still at work once the mesh has marked
# a killed peer down (its TTL is about 2 s).
TREE = {"depth": DEPTH, "fanout": FANOUT, "leaf_steps": 2, "step_seconds": 0.5}
NODES = sum(FANOUT**d for d in range(DEPTH + 1))


@dataclass
class Samples:
    """The committed state as peers showed it, sampled while the tree ran."""

    taken: int = 0
    overcommitted: list[dict[str, Any]] = field(default_factory=list)
    peak_waiting: int = 0
    peak_running: int = 0


async def sample_cluster(clients: list[MeshClient], samples: Samples) -> None:
    """Poll /v1/cluster through whichever peer answers, until cancelled."""
    while True:
        for client in clients:
            with contextlib.suppress(Exception):
                cluster = await client.cluster()
                break
        else:
            await asyncio.sleep(0.1)
            continue
        samples.taken += 1
        up = [p for p in cluster["peers"] if p["status"] == "up"]
        samples.overcommitted += [p for p in cluster["peers"] if p["running"] > p["slots"]]
        samples.peak_waiting = max(samples.peak_waiting, cluster["runs"]["waiting"])
        samples.peak_running = max(samples.peak_running, sum(p["running"] for p in up))
        await asyncio.sleep(0.1)


async def test_a_tree_deeper_than_the_slots_completes_through_a_kill_9(
    make_mesh,
) -> None:
    """Depth 3 at fan-out 3 (40 runs) on 3 peers of 1 slot: every node
    succeeds with its subtree's counts, no peer ever runs more than its slot,
    and killing the peer that ran the root before it waited leaves the root
    waiting as it was (same epoch, same attempts, no owner, no new children)."""
    mesh: DevMesh = await make_mesh("postgres", slots=1, env=PROBES)
    clients = [MeshClient(p.url, timeout_s=10) for p in mesh.peers]
    by_peer = dict(zip((p.id for p in mesh.peers), clients, strict=True))
    samples = Samples()
    sampler = asyncio.create_task(sample_cluster(clients, samples))
    try:
        root_id = (await clients[0].submit("probe_fanout", TREE))["id"]

        async def root_waiting() -> dict[str, Any] | None:
            run = await clients[1].get_run(root_id)
            return run if run["status"] == "waiting" else None

        before = await eventually(root_waiting, 60, "the root to wait for its children")
        assert before["owner"] is None
        owners = (await clients[1].steps(root_id))["owners"]
        victim = owners[-1]["peer"]
        mesh.kill(victim)
        survivor = next(c for p, c in by_peer.items() if p != victim)

        async def victim_down() -> bool:
            peers = (await survivor.cluster())["peers"]
            return any(p["id"] == victim and p["status"] != "up" for p in peers)

        await eventually(victim_down, 30, f"the mesh to mark {victim} down")
        after = await survivor.get_run(root_id)
        assert after["status"] == "waiting", after
        kept = ("owner", "epoch", "attempts")
        assert {k: after[k] for k in kept} == {k: before[k] for k in kept}, (before, after)

        done = await wait_all_terminal(survivor, [root_id], timeout_s=180)
        assert done[root_id]["status"] == "succeeded", done
        leaves = FANOUT**DEPTH
        assert done[root_id]["result"] == {
            "depth": DEPTH,
            "leaves": leaves,
            "steps": leaves * TREE["leaf_steps"],
        }
        nodes = (await survivor.list_runs(agent="probe_fanout", limit=2 * NODES))["runs"]
        assert len(nodes) == NODES, "a resumed parent started children again"
        runs = await wait_all_terminal(survivor, [n["id"] for n in nodes], timeout_s=30)
        assert {r["status"] for r in runs.values()} == {"succeeded"}
        depths = Counter(r["result"]["depth"] for r in runs.values())
        assert depths == {d: FANOUT ** (DEPTH - d) for d in range(DEPTH + 1)}
        for run in runs.values():
            below = FANOUT ** run["result"]["depth"]
            assert run["result"] == {
                "depth": run["result"]["depth"],
                "leaves": below,
                "steps": below * TREE["leaf_steps"],
            }, run
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        for client in clients:
            await client.close()
    assert samples.taken >= 10, samples
    assert not samples.overcommitted, f"a peer ran more runs than its slots: {samples}"
    assert samples.peak_running <= len(mesh.peers)
    # More parents waiting at once than the mesh has slots: they held none.
    assert samples.peak_waiting > len(mesh.peers), samples
    print(
        f"tree of {NODES} runs on {len(mesh.peers)} slots: {samples.taken} samples, "
        f"peak running {samples.peak_running}, peak waiting {samples.peak_waiting}"
    )


async def test_a_parent_gets_its_childs_failure(make_mesh) -> None:
    """A failed child reaches its parent's ``await`` as ChildFailed naming
    the child, its status and its error (README, ctx.spawn); a parent that
    does not catch it fails with it."""
    mesh: DevMesh = await make_mesh("postgres", slots=1, env=PROBES)
    client = MeshClient(mesh.peers[0].url, timeout_s=10)
    try:
        message = f"boom-{uuid.uuid4().hex[:8]}"
        caught = (await client.submit("probe_failing_child", {"message": message, "catch": True}))[
            "id"
        ]
        raised = (await client.submit("probe_failing_child", {"message": message, "catch": False}))[
            "id"
        ]
        done = await wait_all_terminal(client, [caught, raised], timeout_s=90)

        assert done[caught]["status"] == "succeeded", done[caught]
        got = done[caught]["result"]
        assert got["status"] == "failed" and message in got["error"], got
        child = await client.get_run(got["child_id"])
        assert (child["agent"], child["status"]) == ("probe_fail", "failed"), child
        assert message in child["error"], child

        assert done[raised]["status"] == "failed", done[raised]
        error = done[raised]["error"]
        assert "ChildFailed" in error and message in error, error
    finally:
        await client.close()
