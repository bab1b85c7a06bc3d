"""Cancelling a parent cancels its children, in the pure state machine."""

from __future__ import annotations

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.state import MeshState


def submit(state: MeshState, run_id: str, parent: str | None = None) -> None:
    spec = {"id": run_id, "agent": "fanout", "input": None, "parent_id": parent}
    result = state.apply(c.Submit(f"s-{run_id}", 1, [spec]))
    assert result.runs[0].created


def test_cancel_takes_every_descendant_and_nothing_else():
    state = MeshState()
    state.apply(c.PeerUp("p", 1, "peer-1", "inc", "r:1", "h:1", 8, {}, ["fanout"]))
    for run_id, parent in [
        ("root", None),
        ("a", "root"),
        ("b", "root"),
        ("a1", "a"),
        ("x", None),
        ("x1", "x"),
    ]:
        submit(state, run_id, parent)
    state.apply(
        c.Assign("as", 2, 1, [("root", "peer-1", 1), ("a", "peer-1", 1), ("x", "peer-1", 1)])
    )
    assert state.running_on("peer-1") == 3

    result = state.apply(c.Cancel("cx", 3, "root"))

    assert result == res.CancelRequested("running", ["root", "a", "b", "a1"])
    runs = state.runs
    # running ones are flagged for their owner to stop; queued ones end at once
    # (settling: the leader records "cancelled" in storage, then settles them)
    assert [runs[i].status for i in ("root", "a", "b", "a1")] == [
        "running",
        "running",
        "settling",
        "settling",
    ]
    assert all(runs[i].cancel_requested for i in ("root", "a", "b", "a1"))
    assert {runs[i].outcome for i in ("b", "a1")} == {"cancelled"}
    assert not runs["x"].cancel_requested and not runs["x1"].cancel_requested
    assert runs["x1"].status == "queued", "an unrelated tree is untouched"
    assert state.apply(c.Finish("f", 4, "a", 1, "cancelled", None)).ok
    assert state.running_on("peer-1") == 2, "a stopped child frees its slot"
    assert state.apply(c.Settle("s", 5, "b")).ok and "b" not in state.runs
    assert state.apply(c.Cancel("cx", 6, "x")) == result, "a retried cid applies once"
    assert state.apply(c.Cancel("cz", 7, "gone")) == res.Rejected(
        res.Rejection.UNKNOWN_RUN, "run is not active"
    )
