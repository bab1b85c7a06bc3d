"""Slots in use as operators see them (/metrics, /v1/cluster): a peer's runs
held ready beyond its slots (prefetch) are not slots in use. Pure: a
MeshState driven by commands, no peer."""

from __future__ import annotations

from prometheus_client import generate_latest

from raftmesh.consensus import commands as c
from raftmesh.consensus.state import MeshState
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.queue_view import queue_summary, slot_use
from raftmesh.mesh.scheduler import Scheduler

T0 = 1_700_000_000_000


def test_runs_held_beyond_the_slots_are_counted_apart_from_slots_in_use() -> None:
    state = MeshState()
    for cmd in (
        c.Configure("cfg", T0, {}, None, prefetch=2),
        c.PeerUp("up", T0, "p1", "i1", "r-p1", "h-p1", 2, {"zone": "a"}),
        c.Submit("sub", T0, [{"id": f"r{i}", "agent": "echo"} for i in range(5)]),
        c.Assign("as", T0, 1, [(f"r{i}", "p1", 1) for i in range(4)]),
    ):
        assert state.apply(cmd).ok, cmd
    assert state.running_on("p1") == 4, "two running, two held ready"

    use = slot_use(state)
    assert use["peers"]["p1"] == {"slots": 2, "used": 2, "held": 2}
    assert use["labels"]["zone=a"] == {"slots": 2, "used": 2, "held": 2}

    metrics = Metrics()
    metrics.set_queue(queue_summary(state, Scheduler("least-loaded", 60.0), T0), use)
    text = generate_latest(metrics.registry).decode()
    assert 'raftmesh_mesh_slots_used{peer="p1"} 2.0' in text
    assert 'raftmesh_mesh_runs_held{peer="p1"} 2.0' in text
