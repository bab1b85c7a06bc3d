"""Cancelling a parent cancels its children, in the pure state machine."""

from __future__ import annotations

from consensus import commands as c
from consensus.state import MeshState


def submit(state: MeshState, run_id: str, parent: str | None = None) -> None:
    spec = {"id": run_id, "agent": "fanout", "input": None, "parent_id": parent}
    result = state.apply(c.submit(f"s-{run_id}", 1, [spec]))
    assert result["runs"][0]["created"]


def test_cancel_takes_every_descendant_and_nothing_else():
    state = MeshState()
    state.apply(c.peer_up("p", 1, "peer-1", "inc", "r:1", "h:1", 8, {}, ["fanout"]))
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
        c.assign("as", 2, 1, [("root", "peer-1", 1), ("a", "peer-1", 1), ("x", "peer-1", 1)])
    )
    assert state.running_on("peer-1") == 3

    result = state.apply(c.cancel("cx", 3, "root"))

    assert result == {"ok": True, "cancelled": ["root", "a", "b", "a1"]}
    assert set(state.runs) == {"x", "x1"}, "an unrelated tree is untouched"
    assert state.running_on("peer-1") == 1, "the cancelled runs' slots are free again"
    assert state.apply(c.cancel("cy", 4, "root")) == {
        "ok": False,
        "error": "unknown or finished run",
    }
    assert state.apply(c.cancel("cx", 5, "x")) == result, "a retried cid applies once"
