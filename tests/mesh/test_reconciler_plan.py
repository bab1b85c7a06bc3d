"""The reconciler's decision, from plain values: what to stop, start, hand back."""

from __future__ import annotations

from raftmesh.consensus.spec import RunSpec
from raftmesh.mesh.reconciler import plan
from raftmesh.runner.attempt import Assignment


def job(run_id: str, epoch: int = 1, cancel: bool = False) -> Assignment:
    return Assignment(
        run_id=run_id, epoch=epoch, attempt=1, spec=RunSpec("echo"), cancel_requested=cancel
    )


def test_new_assignments_start_and_runs_taken_away_stop() -> None:
    actions = plan([job("a"), job("b")], {"b": 1, "c": 4}, {("b", 1)}, set(), False, True)
    assert actions.start == [job("a")]
    assert actions.stop == ["c"]
    assert actions.hand_back == [] and actions.release == [] and actions.cancel == []


def test_a_run_reassigned_to_this_peer_under_a_new_epoch_stops_the_old_attempt() -> None:
    actions = plan([job("a", epoch=3)], {"a": 2}, {("a", 2)}, set(), False, True)
    assert actions.stop == ["a"]
    assert actions.start == [job("a", epoch=3)]


def test_an_attempt_that_stopped_is_handed_back_once_never_restarted() -> None:
    first = plan([job("a")], {}, {("a", 1)}, set(), False, True)
    assert first.start == [] and first.hand_back == [job("a")]
    again = plan([job("a")], {}, {("a", 1)}, {("a", 1)}, False, True)
    assert again.hand_back == [] and again.start == []


def test_a_cancel_request_reaches_the_running_attempt() -> None:
    actions = plan([job("a", cancel=True)], {"a": 1}, {("a", 1)}, set(), False, True)
    assert actions.cancel == [job("a", cancel=True)]


def test_draining_with_release_releases_what_runs_and_a_cut_off_peer_starts_nothing() -> None:
    actions = plan([job("a"), job("b")], {"a": 1}, {("a", 1)}, set(), True, False)
    assert actions.release == ["a"]
    assert actions.start == [] and actions.hand_back == []


def test_a_run_asked_to_pause_is_released_if_it_runs_and_handed_back_if_not() -> None:
    pausing = Assignment(run_id="a", epoch=1, attempt=1, spec=RunSpec("echo"), pause_requested=True)
    later = Assignment(run_id="b", epoch=1, attempt=1, spec=RunSpec("echo"), pause_requested=True)
    actions = plan([pausing, later], {"a": 1}, {("a", 1)}, set(), False, True)
    assert actions.release == ["a"]
    assert actions.hand_back == [later] and actions.start == []
    again = plan([later], {}, set(), {("b", 1)}, False, True)
    assert again.hand_back == [] and again.start == [], "handed back once"
