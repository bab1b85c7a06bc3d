"""Suspension in the replicated state (issue 11): waits, signals, wakes, pauses.

Examples first, one per transition of WAITING_INTERFACE (suspend, wake,
signal, pause, resume, cancel of an ownerless run, snapshots from before
version 4), then a hypothesis state machine that interleaves them with
submits, assigns, releases, finishes and peer losses and checks after every
step that a waiting or paused run has no owner, holds no slot and counts in
no tenant counter, that a wake only wakes a run whose wait is over, that a
signal is consumed once, and that the state survives a snapshot.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_apply_total import VALUES
from test_state_properties import snapshot_roundtrip, wire

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.model import PEER_UP
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.status import ACTIVE_STATUSES, TERMINAL_STATUSES, RunStatus
from raftmesh.consensus.waits import WAIT_KEYS, checked_wait, wait_satisfied

T0 = 1_000_000
OWNERLESS = (RunStatus.WAITING, RunStatus.PAUSED)


def timer(due_ms: int) -> dict[str, Any]:
    return {"kind": "timer", "due_ms": due_ms}


def signal(name: str, index: int, due_ms: int | None = None) -> dict[str, Any]:
    return {"kind": "signal", "signal": name, "index": index, "due_ms": due_ms}


def children(*ids: str) -> dict[str, Any]:
    return {"kind": "children", "children": list(ids)}


class Mesh:
    """A state with two peers of one slot each and helpers to drive it."""

    def __init__(self) -> None:
        self.state = MeshState()
        self.n = 0
        for peer in ("p1", "p2"):
            self.ok(c.PeerUp(self.cid(), T0, peer, "i1", f"r-{peer}", f"h-{peer}", 1, {}))

    def cid(self) -> str:
        self.n += 1
        return f"c{self.n}"

    def apply(self, cmd: c.Command) -> Any:
        return self.state.apply(wire(cmd))

    def ok(self, cmd: c.Command) -> Any:
        result = self.apply(cmd)
        assert result.ok, result
        return result

    def submit(self, run_id: str, **spec: Any) -> None:
        self.ok(c.Submit(self.cid(), T0, [{"id": run_id, "agent": "echo", **spec}]))

    def start(self, run_id: str, peer: str = "p1") -> int:
        epoch = self.state.runs[run_id].epoch + 1
        result = self.ok(c.Assign(self.cid(), T0, 1, [(run_id, peer, epoch)]))
        assert result.accepted == [run_id], result
        return epoch

    def suspend(self, run_id: str, wait: dict[str, Any], at_ms: int = T0) -> Any:
        epoch = self.state.runs[run_id].epoch
        return self.apply(c.Suspend(self.cid(), at_ms, run_id, epoch, wait))

    def wake(self, *run_ids: str, at_ms: int = T0) -> Any:
        return self.ok(c.Wake(self.cid(), at_ms, list(run_ids)))

    def status(self, run_id: str) -> RunStatus:
        return self.state.runs[run_id].status


def holds_nothing(state: MeshState, run_id: str) -> None:
    run = state.runs[run_id]
    assert run.owner is None
    assert all(run_id not in ids for ids in state.by_owner.values())
    # the tenant counters count queued and running runs only
    for status, counter in (
        (RunStatus.QUEUED, state.tenant_queued),
        (RunStatus.RUNNING, state.tenant_running),
    ):
        counted = Counter(r.spec.tenant for r in state.runs.values() if r.status == status)
        assert counter == dict(counted), status


def test_a_suspended_run_frees_its_slot_and_a_timer_wakes_it_when_due() -> None:
    mesh = Mesh()
    mesh.submit("r")
    mesh.start("r")
    assert mesh.state.running_on("p1") == 1
    assert mesh.suspend("r", timer(T0 + 5000)) == res.Suspended(RunStatus.WAITING)
    assert mesh.status("r") == RunStatus.WAITING
    assert mesh.state.running_on("p1") == 0
    holds_nothing(mesh.state, "r")
    assert mesh.state.runs["r"].waiting_for == checked_wait(timer(T0 + 5000))
    # the freed slot takes other work at once
    mesh.submit("other")
    mesh.start("other")
    assert mesh.wake("r", at_ms=T0 + 4999) == res.Woken([], ["r"])
    assert mesh.wake("r", at_ms=T0 + 5000) == res.Woken(["r"], [])
    run = mesh.state.runs["r"]
    assert (run.status, run.waiting_for, run.epoch) == (RunStatus.QUEUED, None, 1)
    assert mesh.state.tenant_queued == {"default": 1}
    assert mesh.start("r", "p2") == 2, "the next owner gets epoch + 1"


def test_only_the_owner_at_its_epoch_suspends_and_a_bad_wait_changes_nothing() -> None:
    mesh = Mesh()
    mesh.submit("r")
    mesh.start("r")
    before = mesh.state.runs["r"].public()
    stale = mesh.apply(c.Suspend(mesh.cid(), T0, "r", 7, timer(T0)))
    assert stale.reason == res.Rejection.STALE_EPOCH
    for bad in (
        {"kind": "sleep", "due_ms": T0},
        timer(-1),
        {"kind": "timer"},
        {**timer(T0), "extra": 1},
        signal("bad name!", 0),
        signal("go", -1),
        children(),
        {"kind": "children", "children": [1]},
        {"kind": ["timer"]},
    ):
        refused = mesh.suspend("r", bad)
        assert refused.reason == res.Rejection.INVALID, (bad, refused)
    assert mesh.state.runs["r"].public() == before
    assert mesh.state.running_on("p1") == 1


def test_a_signal_sent_before_the_wait_wakes_it_and_each_seq_is_consumed_once() -> None:
    mesh = Mesh()
    mesh.submit("r")
    assert mesh.ok(c.Signal(mesh.cid(), T0, "r", "go", 0)) == res.Signalled(1)
    mesh.start("r")
    mesh.suspend("r", signal("go", 0))
    assert wait_satisfied(mesh.state.runs["r"], mesh.state, T0)
    assert mesh.wake("r").woken == ["r"]
    # the replayed run consumed seq 0; it waits for the next one
    mesh.start("r")
    mesh.suspend("r", signal("go", 1))
    assert mesh.wake("r").skipped == ["r"], "seq 0 is not delivered twice"
    # an older announcement arriving late does not count again
    assert mesh.ok(c.Signal(mesh.cid(), T0, "r", "go", 0)) == res.Signalled(1)
    assert mesh.wake("r").skipped == ["r"]
    mesh.ok(c.Signal(mesh.cid(), T0, "r", "go", 1))
    assert mesh.wake("r").woken == ["r"]


def test_a_signal_wait_times_out_at_its_due_time() -> None:
    mesh = Mesh()
    mesh.submit("r")
    mesh.start("r")
    mesh.suspend("r", signal("go", 0, due_ms=T0 + 100))
    assert mesh.wake("r", at_ms=T0 + 99).skipped == ["r"]
    assert mesh.wake("r", at_ms=T0 + 100).woken == ["r"]


def test_signal_refusals() -> None:
    mesh = Mesh()
    mesh.submit("r")
    unknown = mesh.apply(c.Signal(mesh.cid(), T0, "nope", "go", 0))
    assert unknown.reason == res.Rejection.UNKNOWN_RUN
    for name in ("", "x" * 129, "a b", "é"):
        bad = mesh.apply(c.Signal(mesh.cid(), T0, "r", name, 0))
        assert bad.reason == res.Rejection.INVALID, name
    assert mesh.apply(c.Signal(mesh.cid(), T0, "r", "go", -1)).reason == res.Rejection.INVALID
    mesh.ok(c.Cancel(mesh.cid(), T0, "r"))
    ending = mesh.apply(c.Signal(mesh.cid(), T0, "r", "go", 0))
    assert ending.reason == res.Rejection.CONFLICT
    assert mesh.state.runs["r"].signals == {}


def test_a_children_wait_ends_when_every_child_has_left_the_state() -> None:
    mesh = Mesh()
    mesh.submit("parent")
    mesh.start("parent")
    mesh.submit("a", parent_id="parent")
    mesh.submit("b", parent_id="parent")
    mesh.suspend("parent", children("a", "b"))
    holds_nothing(mesh.state, "parent")
    epoch = mesh.start("a")
    mesh.ok(c.Finish(mesh.cid(), T0, "a", epoch, "succeeded", None))
    assert mesh.wake("parent").skipped == ["parent"]
    mesh.ok(c.Cancel(mesh.cid(), T0, "b"))
    assert mesh.status("b") == RunStatus.SETTLING
    assert mesh.wake("parent").skipped == ["parent"], "a settling child is still there"
    mesh.ok(c.Settle(mesh.cid(), T0, "b"))
    assert mesh.wake("parent").woken == ["parent"]


def test_pause_and_resume_of_queued_waiting_and_running_runs() -> None:
    mesh = Mesh()
    mesh.submit("q")
    assert mesh.ok(c.Pause(mesh.cid(), T0, "q")) == res.PauseChanged(RunStatus.PAUSED)
    holds_nothing(mesh.state, "q")
    assert mesh.ok(c.Pause(mesh.cid(), T0, "q")).status == RunStatus.PAUSED, "idempotent"
    assert mesh.ok(c.Resume(mesh.cid(), T0, "q")) == res.PauseChanged(RunStatus.QUEUED)
    assert mesh.state.tenant_queued == {"default": 1}
    again = mesh.apply(c.Resume(mesh.cid(), T0, "q"))
    assert again.reason == res.Rejection.CONFLICT

    # running: the owner is asked; its release parks the run
    epoch = mesh.start("q")
    assert mesh.ok(c.Pause(mesh.cid(), T0, "q")) == res.PauseChanged(RunStatus.RUNNING, True)
    mesh.ok(c.Release(mesh.cid(), T0, "q", epoch))
    assert mesh.status("q") == RunStatus.PAUSED
    assert not mesh.state.runs["q"].pause_requested
    holds_nothing(mesh.state, "q")
    mesh.ok(c.Resume(mesh.cid(), T0, "q"))

    # running, asked to pause, then it suspends: paused, the wait kept
    mesh.start("q")
    mesh.ok(c.Pause(mesh.cid(), T0, "q"))
    assert mesh.suspend("q", timer(T0 + 10)) == res.Suspended(RunStatus.PAUSED)
    assert mesh.state.runs["q"].waiting_for is not None
    assert mesh.wake("q", at_ms=T0 + 10).skipped == ["q"], "a paused run is not woken"
    mesh.ok(c.Resume(mesh.cid(), T0, "q"))
    assert (mesh.status("q"), mesh.state.runs["q"].waiting_for) == (RunStatus.QUEUED, None)

    # a withdrawn request: the run keeps running
    mesh.start("q")
    mesh.ok(c.Pause(mesh.cid(), T0, "q"))
    assert mesh.ok(c.Resume(mesh.cid(), T0, "q")) == res.PauseChanged(RunStatus.RUNNING)

    # waiting: paused, the wait kept
    mesh.suspend("q", signal("go", 0))
    mesh.ok(c.Pause(mesh.cid(), T0, "q"))
    assert mesh.state.runs["q"].waiting_for == checked_wait(signal("go", 0))

    mesh.ok(c.Cancel(mesh.cid(), T0, "q"))
    for refused in (c.Pause(mesh.cid(), T0, "q"), c.Resume(mesh.cid(), T0, "q")):
        assert mesh.apply(refused).reason == res.Rejection.CONFLICT
    assert mesh.apply(c.Pause(mesh.cid(), T0, "gone")).reason == res.Rejection.UNKNOWN_RUN


def test_a_lost_owner_of_a_run_asked_to_pause_parks_it() -> None:
    mesh = Mesh()
    mesh.submit("r")
    mesh.start("r")
    mesh.ok(c.Pause(mesh.cid(), T0, "r"))
    mesh.ok(c.PeerDown(mesh.cid(), T0, "p1", "i1"))
    assert mesh.status("r") == RunStatus.PAUSED
    holds_nothing(mesh.state, "r")


def test_cancel_settles_waiting_and_paused_runs_at_once_and_a_cancelled_run_never_waits() -> None:
    mesh = Mesh()
    for run_id in ("w", "p", "s"):
        mesh.submit(run_id)
    mesh.start("w")
    mesh.suspend("w", timer(T0 + 1))
    mesh.ok(c.Pause(mesh.cid(), T0, "p"))
    for run_id in ("w", "p"):
        mesh.ok(c.Cancel(mesh.cid(), T0, run_id))
        run = mesh.state.runs[run_id]
        assert (run.status, run.outcome, run.waiting_for) == (
            RunStatus.SETTLING,
            RunStatus.CANCELLED,
            None,
        )
    mesh.start("s")
    mesh.ok(c.Cancel(mesh.cid(), T0, "s"))
    assert mesh.suspend("s", timer(T0 + 1)) == res.Suspended(RunStatus.SETTLING)
    assert mesh.state.runs["s"].outcome == RunStatus.CANCELLED


def test_a_waiting_run_is_unaffected_by_the_loss_of_any_peer() -> None:
    mesh = Mesh()
    mesh.submit("r")
    mesh.start("r", "p1")
    mesh.suspend("r", signal("go", 0))
    before = mesh.state.runs["r"].public()
    mesh.ok(c.PeerDown(mesh.cid(), T0, "p1", "i1"))
    mesh.ok(c.PeerUp(mesh.cid(), T0, "p2", "i2", "r-p2", "h-p2", 1, {}))
    mesh.ok(c.PeerLeave(mesh.cid(), T0, "p1"))
    assert mesh.state.runs["r"].public() == before


def test_a_version_3_snapshot_loads_with_no_waits() -> None:
    mesh = Mesh()
    mesh.submit("q")
    mesh.submit("r")
    mesh.start("r")
    old = mesh.state.to_dict()
    old["v"] = 3
    for run in old["runs"]:
        for name in ("waiting_for", "signals", "pause_requested"):
            del run[name]
    state = MeshState.from_dict(old)
    assert state.runs["r"].status == RunStatus.RUNNING and state.by_owner == {"p1": {"r"}}
    assert (state.runs["q"].waiting_for, state.runs["q"].signals) == (None, {})
    assert state.to_dict()["v"] == MeshState().to_dict()["v"], "written back as today's version"
    assert state.tenant_queued == {"default": 1}


def test_a_waiting_run_round_trips_through_a_snapshot() -> None:
    mesh = Mesh()
    mesh.submit("r")
    mesh.ok(c.Signal(mesh.cid(), T0, "r", "go", 2))
    mesh.start("r")
    mesh.suspend("r", children("x"))
    copy_ = snapshot_roundtrip(mesh.state)
    assert copy_.to_dict() == mesh.state.to_dict()
    assert copy_.runs["r"].signals == {"go": 3}
    assert copy_.by_owner.get("p1", set()) == set()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*WAIT_KEYS, "x"]), VALUES, max_size=6))
def test_any_wait_map_is_judged_without_raising(wait: dict[str, Any]) -> None:
    mesh = Mesh()
    mesh.submit("r")
    mesh.start("r")
    before = mesh.state.runs["r"].public()
    result = mesh.state.apply(c.Suspend("z", T0, "r", 1, wait).to_wire())
    if result.ok:
        assert mesh.status("r") == RunStatus.WAITING
        holds_nothing(mesh.state, "r")
        assert mesh.state.runs["r"].waiting_for == checked_wait(wait)
    else:
        assert result.reason == res.Rejection.INVALID, result
        assert mesh.state.runs["r"].public() == before
    assert snapshot_roundtrip(mesh.state).to_dict() == mesh.state.to_dict()


# -- the state machine --------------------------------------------------------

RUNS = [f"r{i}" for i in range(6)]
PEERS = ["p1", "p2", "p3"]
NAMES = ["go", "stop"]
TENANTS = ["default", "t1"]


class WaitMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = MeshState()
        self.clock = T0
        self.n = 0
        # what the runner of each run has consumed: (run, name) -> signals taken
        self.consumed: Counter[tuple[str, str]] = Counter()
        self.delivered: set[tuple[str, str, int]] = set()
        for peer in PEERS:
            self.do(c.PeerUp(self.cid(), self.clock, peer, "i1", f"r-{peer}", f"h-{peer}", 2, {}))
        for i, run in enumerate(RUNS):
            spec = {"id": run, "agent": "a", "tenant": TENANTS[i % 2]}
            self.do(c.Submit(self.cid(), self.clock, [spec]))

    def cid(self) -> str:
        self.n += 1
        return f"c{self.n}"

    def do(self, cmd: c.Command) -> Any:
        result = self.state.apply(wire(cmd))
        assert isinstance(result.ok, bool), result
        # a run gone from the state takes its mailbox with it (an id may come back)
        for key in [k for k in self.consumed if k[0] not in self.state.runs]:
            del self.consumed[key]
        self.delivered = {d for d in self.delivered if d[0] in self.state.runs}
        return result

    def runs_in(self, *statuses: RunStatus) -> list[str]:
        return sorted(r.id for r in self.state.runs.values() if r.status in statuses)

    @rule(run=st.sampled_from(RUNS), tenant=st.sampled_from(TENANTS))
    def submit(self, run: str, tenant: str) -> None:
        self.do(c.Submit(self.cid(), self.clock, [{"id": run, "agent": "a", "tenant": tenant}]))

    @rule(order=st.permutations(PEERS))
    def assign(self, order: list[str]) -> None:
        """The leader places every queued run it can (apply judges each)."""
        batch = []
        for run_id, peer in zip(self.runs_in(RunStatus.QUEUED), order * 2, strict=False):
            batch.append((run_id, peer, self.state.runs[run_id].epoch + 1))
        self.do(c.Assign(self.cid(), self.clock, 1, batch))

    @rule(data=st.data(), stale=st.booleans())
    def suspend(self, data: st.DataObject, stale: bool) -> None:
        running = self.runs_in(RunStatus.RUNNING)
        if not running:
            return
        run = self.state.runs[data.draw(st.sampled_from(running))]
        kind = data.draw(st.sampled_from(["timer", "signal", "children"]))
        if kind == "timer":
            wait = timer(self.clock + data.draw(st.integers(0, 3000)))
        elif kind == "signal":
            name = data.draw(st.sampled_from(NAMES))
            due = data.draw(st.none() | st.integers(0, 3000).map(lambda d: self.clock + d))
            wait = signal(name, self.consumed[(run.id, name)], due)
        else:
            others = [r for r in RUNS if r != run.id]
            wait = children(*data.draw(st.lists(st.sampled_from(others), min_size=1, max_size=3)))
        epoch = run.epoch + (1 if stale else 0)
        before = run.public()
        result = self.do(c.Suspend(self.cid(), self.clock, run.id, epoch, wait))
        if stale:
            assert result.reason == res.Rejection.STALE_EPOCH
            assert self.state.runs[run.id].public() == before
        else:
            assert result.status in (RunStatus.WAITING, RunStatus.PAUSED, RunStatus.SETTLING)

    @rule(run=st.sampled_from(RUNS), name=st.sampled_from(NAMES))
    def send_signal(self, run: str, name: str) -> None:
        """Storage gives seqs densely per (run, name); the API announces each."""
        known = self.state.runs.get(run)
        seq = known.signals.get(name, 0) if known is not None else 0
        result = self.do(c.Signal(self.cid(), self.clock, run, name, seq))
        if known is None:
            assert result.reason == res.Rejection.UNKNOWN_RUN
        elif known.status != RunStatus.SETTLING:
            assert result == res.Signalled(seq + 1)

    @rule(extra=st.lists(st.sampled_from(RUNS), max_size=2), later_ms=st.integers(0, 4000))
    def leader_wakes(self, extra: list[str], later_ms: int) -> None:
        """What the leader proposes from its view at its next tick, and ids it
        has no business naming: apply wakes exactly the runs whose wait is over."""
        self.clock += later_ms
        due = [r.id for r in self.state.runs.values() if wait_satisfied(r, self.state, self.clock)]
        waits = {rid: copy.deepcopy(self.state.runs[rid].waiting_for) for rid in due}
        names = sorted(set(due) | set(extra))
        result = self.do(c.Wake(self.cid(), self.clock, names))
        assert sorted(result.woken) == sorted(due), result
        for rid in result.woken:
            wait = waits[rid]
            run = self.state.runs[rid]
            assert (run.status, run.waiting_for) == (RunStatus.QUEUED, None)
            if wait["kind"] == "signal" and run.signals.get(wait["signal"], 0) > wait["index"]:
                # the replayed run takes the next signal of that name
                key = (rid, wait["signal"], wait["index"])
                assert key not in self.delivered, f"signal {key} consumed twice"
                self.delivered.add(key)
                self.consumed[(rid, wait["signal"])] += 1

    @rule(run=st.sampled_from(RUNS), act=st.sampled_from(["pause", "resume"] * 2 + ["cancel"]))
    def operator(self, run: str, act: str) -> None:
        if act == "pause":
            self.do(c.Pause(self.cid(), self.clock, run))
        elif act == "resume":
            self.do(c.Resume(self.cid(), self.clock, run))
        else:
            known = self.state.runs.get(run)
            was = known.status if known is not None else None
            self.do(c.Cancel(self.cid(), self.clock, run))
            if was in OWNERLESS:
                assert self.state.runs[run].status == RunStatus.SETTLING

    @rule(data=st.data())
    def owner_ends(self, data: st.DataObject) -> None:
        running = self.runs_in(RunStatus.RUNNING)
        if not running:
            return
        run = self.state.runs[data.draw(st.sampled_from(running))]
        end = data.draw(st.sampled_from(["finish", "release", "fail"]))
        if end == "finish":
            self.do(c.Finish(self.cid(), self.clock, run.id, run.epoch, "succeeded", None))
        elif end == "release":
            self.do(c.Release(self.cid(), self.clock, run.id, run.epoch))
        else:
            self.do(c.Fail(self.cid(), self.clock, run.id, run.epoch, "error", "boom"))

    @rule(run=st.sampled_from(RUNS))
    def settle(self, run: str) -> None:
        if run in self.state.runs and self.state.runs[run].status == RunStatus.SETTLING:
            assert self.do(c.Settle(self.cid(), self.clock, run)).ok

    @rule(peer=st.sampled_from(PEERS), back=st.sampled_from([True, True, True, False]))
    def peer_lost(self, peer: str, back: bool) -> None:
        ownerless = {r.id: r.public() for r in self.state.runs.values() if r.status in OWNERLESS}
        incarnation = self.state.peers[peer].incarnation
        self.do(c.PeerDown(self.cid(), self.clock, peer, incarnation))
        if back:
            fresh = f"{incarnation}x"
            self.do(c.PeerUp(self.cid(), self.clock, peer, fresh, f"r-{peer}", "h", 2, {}))
        for rid, before in ownerless.items():
            assert self.state.runs[rid].public() == before, "a peer's loss touched a waiting run"

    @rule(ms=st.integers(1, 4000))
    def time_passes(self, ms: int) -> None:
        self.clock += ms

    @precondition(lambda self: bool(self.state.runs))
    @rule()
    def snapshot_restore(self) -> None:
        restored = snapshot_roundtrip(self.state)
        assert restored.to_dict() == self.state.to_dict()
        self.state = restored

    @invariant()
    def ownerless_runs_hold_nothing(self) -> None:
        running: Counter[str] = Counter()
        queued: Counter[str] = Counter()
        owners: dict[str, set[str]] = {}
        for run in self.state.runs.values():
            if run.status == RunStatus.RUNNING:
                running[run.spec.tenant] += 1
                owners.setdefault(run.owner, set()).add(run.id)
                assert self.state.peers[run.owner].status == PEER_UP
            elif run.status == RunStatus.QUEUED:
                queued[run.spec.tenant] += 1
            if run.status in OWNERLESS:
                assert run.owner is None and run.assigned_at_ms is None
            if run.status == RunStatus.WAITING:
                assert run.waiting_for == checked_wait(run.waiting_for)
            if run.pause_requested:
                assert run.status == RunStatus.RUNNING
        assert {p: ids for p, ids in self.state.by_owner.items() if ids} == owners
        assert self.state.tenant_running == dict(running)
        assert self.state.tenant_queued == dict(queued)
        for peer in self.state.peers.values():
            assert self.state.running_on(peer.id) <= peer.slots
        runs = self.state.runs.values()
        assert {r.id for r in self.state.queued()} == {
            r.id for r in runs if r.status == RunStatus.QUEUED
        }
        assert self.state.waiting_ids == {r.id for r in runs if r.status == RunStatus.WAITING}
        assert self.state.settling_ids == {r.id for r in runs if r.status == RunStatus.SETTLING}

    @invariant()
    def no_signal_is_consumed_before_it_is_announced(self) -> None:
        for (rid, name), taken in self.consumed.items():
            run = self.state.runs.get(rid)
            if run is not None:
                assert taken <= run.signals.get(name, 0)


WaitMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestWaitStateMachine = WaitMachine.TestCase


@pytest.mark.parametrize("status", [RunStatus.WAITING, RunStatus.PAUSED])
def test_ownerless_statuses_are_active(status: RunStatus) -> None:
    assert status in ACTIVE_STATUSES and status not in TERMINAL_STATUSES
