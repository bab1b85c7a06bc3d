"""What operators see of waiting and paused runs: the run view says what a
suspended run waits for, the queue summary lists suspended runs apart from
queue depth, and the metrics gauges count them. Pure: a MeshState driven by
commands, no peer."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest

from raftmesh.consensus import commands as c
from raftmesh.consensus.state import MeshState
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.queue_view import SUSPENDED_LISTED, queue_summary, slot_use
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.mesh.views import VIEW_CHILDREN, active_view

T0 = 1_700_000_000_000
SCHEDULER = Scheduler("least-loaded", 60.0)


class Mesh:
    def __init__(self) -> None:
        self.state = MeshState()
        self.n = 0
        self.ok(c.PeerUp(self.cid(), T0, "p1", "i1", "r-p1", "h-p1", 1000, {}))

    def cid(self) -> str:
        self.n += 1
        return f"c{self.n}"

    def ok(self, cmd: c.Command) -> Any:
        result = self.state.apply(cmd)
        assert result.ok, result
        return result

    def submit(self, run_id: str, at_ms: int = T0) -> None:
        self.ok(c.Submit(self.cid(), at_ms, [{"id": run_id, "agent": "echo"}]))

    def suspended(self, run_id: str, wait: dict[str, Any], at_ms: int = T0) -> None:
        """Submitted, assigned to p1 and suspended in ``wait``."""
        self.submit(run_id, at_ms)
        self.ok(c.Assign(self.cid(), at_ms, 1, [(run_id, "p1", 1)]))
        self.ok(c.Suspend(self.cid(), at_ms, run_id, 1, wait))

    def view(self, run_id: str) -> dict[str, Any]:
        return active_view(self.state, self.state.runs[run_id], SCHEDULER, T0)


def test_a_waiting_runs_view_says_what_it_waits_for() -> None:
    mesh = Mesh()
    mesh.suspended("timer", {"kind": "timer", "due_ms": T0 + 90_000})
    mesh.suspended("signal", {"kind": "signal", "signal": "approve", "index": 0})
    kids = [f"child-{i}" for i in range(VIEW_CHILDREN + 5)]
    mesh.suspended("parent", {"kind": "children", "children": kids})

    timer = mesh.view("timer")
    assert (timer["status"], timer["owner"], timer["pause_requested"]) == ("waiting", None, False)
    assert timer["wait"] == {
        "kind": "timer",
        "due_at": (T0 + 90_000) / 1000,
        "signal": None,
        "children": None,
        "children_total": None,
    }
    assert timer["waiting_for"] == "a timer until 2023-11-14T22:14:50+00:00"
    assert mesh.view("signal")["waiting_for"] == "signal 'approve'"
    assert mesh.view("signal")["wait"]["signal"] == "approve"
    parent = mesh.view("parent")
    assert parent["wait"]["children"] == kids[:VIEW_CHILDREN], "a bounded view"
    assert parent["wait"]["children_total"] == len(kids)
    assert (
        parent["waiting_for"] == f"{len(kids)} child run(s) to end: child-0, child-1, child-2, ..."
    )


def test_pause_requested_shows_on_a_running_run_and_a_paused_run_keeps_its_wait() -> None:
    mesh = Mesh()
    mesh.submit("r")
    mesh.ok(c.Assign(mesh.cid(), T0, 1, [("r", "p1", 1)]))
    mesh.ok(c.Pause(mesh.cid(), T0, "r"))
    running = mesh.view("r")
    assert (running["status"], running["pause_requested"], running["waiting_for"]) == (
        "running",
        True,
        None,
    )
    mesh.suspended("w", {"kind": "signal", "signal": "go", "index": 0, "due_ms": T0 + 1000})
    mesh.ok(c.Pause(mesh.cid(), T0, "w"))
    paused = mesh.view("w")
    assert paused["status"] == "paused" and paused["wait"]["signal"] == "go"
    assert paused["waiting_for"] == (
        "an operator's resume (paused while waiting for signal 'go' "
        "or a timeout until 2023-11-14T22:13:21+00:00)"
    )


def test_suspended_runs_are_listed_apart_from_the_queue_and_counted_by_the_gauges() -> None:
    mesh = Mesh()
    mesh.submit("queued")
    for i in range(SUSPENDED_LISTED + 2):
        mesh.suspended(f"w{i:03}", {"kind": "timer", "due_ms": T0 + 5000}, at_ms=T0 + i)
    mesh.submit("to-pause", at_ms=T0 - 1)
    mesh.ok(c.Pause(mesh.cid(), T0, "to-pause"))

    queue = queue_summary(mesh.state, SCHEDULER, T0 + 10_000)
    assert queue["depth"] == 1, "waiting and paused runs are not queue depth"
    assert queue["tenants"]["default"]["queued"] == 1
    suspended = queue["suspended"]
    assert (suspended["waiting"], suspended["paused"]) == (SUSPENDED_LISTED + 2, 1)
    listed = [r["id"] for r in suspended["runs"]]
    assert listed == ["to-pause"] + [f"w{i:03}" for i in range(SUSPENDED_LISTED - 1)], "oldest"
    assert suspended["runs"][0] == {
        "id": "to-pause",
        "status": "paused",
        "tenant": "default",
        "agent": "echo",
        "waiting_for": "an operator's resume",
    }

    metrics = Metrics()
    metrics.set_queue(queue, slot_use(mesh.state))
    text = generate_latest(metrics.registry).decode()
    assert f"raftmesh_waiting_runs {float(SUSPENDED_LISTED + 2)}" in text
    assert "raftmesh_paused_runs 1.0" in text
    assert "raftmesh_queue_depth 1.0" in text
