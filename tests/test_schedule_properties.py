"""Replicated schedules: a tick fires once, catch-up and overlap do what they say.

The state machine half (``FireTick`` and the schedule commands in
consensus/state.py) is driven straight through ``apply`` in the wire form, as
Raft hands it over; the calendar half (mesh/schedules.py) is a pure function
of a schedule and a clock reading. Together they stand in for leaders that
come and go: several tickers planning on copies of the state of different
ages propose into one log, and every tick still starts one run.
"""

from __future__ import annotations

import copy
import random
from datetime import UTC, datetime
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_apply_total import VALUES, consistent
from test_state_properties import snapshot_roundtrip

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.schedules import tick_key, tick_run_id
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.status import RunStatus
from raftmesh.mesh.schedules import (
    MAX_TICKS_PER_ROUND,
    BadSchedule,
    ScheduleTicker,
    When,
    latest_tick,
    next_tick,
    parse_when,
    plan_ticks,
)

T0 = 1_000_000
EVERY_MS = 2000
_cids = iter(range(10**9))


def cid() -> str:
    return f"c{next(_cids)}"


def wire(cmd: c.Command) -> Any:
    """As the Raft binding hands a command to apply: through an entry's bytes."""
    return c.decode_entry(c.encode_entry([cmd]))[0]


def apply(state: MeshState, cmd: c.Command) -> Any:
    return state.apply(wire(cmd))


def a_mesh() -> MeshState:
    state = MeshState()
    state.apply(c.PeerUp("up", T0, "p1", "i1", "r1", "h1", 4, {}))
    return state


def add_schedule(
    state: MeshState,
    schedule: str = "s",
    *,
    every_ms: int | None = EVERY_MS,
    cron: str | None = None,
    overlap: str = "allow",
    catchup: str = "all",
    tenant: str = "t1",
    at_ms: int = T0,
) -> Any:
    cmd = c.ScheduleSet(
        cid(), at_ms, schedule, cron, every_ms, "UTC", "echo", {"n": 1}, tenant, overlap, catchup
    )
    return apply(state, cmd)


def fire(state: MeshState, tick_ms: int, *, at_ms: int | None = None, go: bool = True) -> Any:
    at = tick_ms if at_ms is None else at_ms
    return apply(state, c.FireTick(cid(), at, "s", tick_ms, go))


def schedule_runs(state: MeshState, schedule: str = "s") -> dict[str, str]:
    """Idempotency key -> run id of the active runs this schedule started."""
    prefix = f"schedule:{schedule}:"
    return {
        r.spec.idempotency_key: r.id
        for r in state.runs.values()
        if r.spec.idempotency_key is not None and r.spec.idempotency_key.startswith(prefix)
    }


# -- a tick fires once ---------------------------------------------------------

TICKS = [T0 - T0 % EVERY_MS + EVERY_MS * k for k in range(1, 9)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(TICKS), st.booleans(), st.integers(0, 3)), max_size=30),
)
def test_a_tick_fires_once_whatever_the_order_and_repetition(
    proposals: list[tuple[int, bool, int]],
) -> None:
    """FireTick commands for the same ticks in any order, repeated, some
    dropping their tick, some proposed late: the state moves past each tick
    once (a reference of "only after the last tick" says which), starts one
    run per fired tick under the tick's key, and never fires a tick it has
    passed."""
    state = a_mesh()
    assert add_schedule(state).created
    last, fired, skipped = T0, [], 0
    for tick, go, late_s in proposals:
        result = fire(state, tick, at_ms=tick + late_s * 1000, go=go)
        if tick > last:
            assert isinstance(result, res.TickFired), result
            last = tick
            if go:
                assert result.run == tick_run_id("s", tick)
                fired.append(tick)
            else:
                assert result.run is None
                skipped += 1
        else:
            assert isinstance(result, res.Rejected), result
            assert result.reason == res.Rejection.CONFLICT
    runs = schedule_runs(state)
    assert sorted(runs) == sorted(tick_key("s", t) for t in fired)
    assert all(state.runs[r].spec.tenant == "t1" for r in runs.values())
    schedule = state.schedules["s"]
    assert (schedule.last_tick_ms, schedule.fired, schedule.skipped) == (last, len(fired), skipped)
    consistent(state)
    assert snapshot_roundtrip(state).to_dict() == state.to_dict()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_leaders_planning_on_stale_copies_fire_each_tick_once(data: st.DataObject) -> None:
    """Three tickers (three leaders over time, or a deposed one still
    proposing) each plan on their own copy of the state, refreshed at random,
    and all propose into one log. Every tick from creation to the end fires
    exactly once under catchup "all"."""
    state = a_mesh()
    catchup = data.draw(st.sampled_from(["all", "one", "none"]), label="catchup")
    add_schedule(state, catchup=catchup)
    tickers = [(ScheduleTicker(), copy.deepcopy(state)) for _ in range(3)]
    now = T0
    for _ in range(data.draw(st.integers(1, 25), label="rounds")):
        now += data.draw(st.sampled_from([100, 500, 2000, 7000]), label="clock")
        i = data.draw(st.integers(0, 2), label="proposer")
        ticker, view = tickers[i]
        if data.draw(st.booleans(), label="refresh"):
            view = copy.deepcopy(state)
            tickers[i] = (ticker, view)
        for cmd in ticker.due(view, now):
            apply(state, cmd)
    # The last leader catches up from the committed state.
    final = ScheduleTicker()
    for _ in range(20):
        cmds = final.due(state, now)
        if not cmds:
            break
        for cmd in cmds:
            apply(state, cmd)
    runs = schedule_runs(state)
    assert len(runs) == len(set(runs.values())), "one run per tick key"
    schedule = state.schedules["s"]
    assert schedule.last_tick_ms == latest_tick(When(None, EVERY_MS, "UTC"), now)
    if catchup == "all":
        due = range(next_tick(When(None, EVERY_MS, "UTC"), T0), now + 1, EVERY_MS)
        assert sorted(runs) == sorted(tick_key("s", t) for t in due)
        assert (schedule.fired, schedule.skipped) == (len(due), 0)
    consistent(state)


# -- catch-up --------------------------------------------------------------------


def test_catchup_all_fires_every_missed_tick_in_order_bounded_per_round() -> None:
    state = a_mesh()
    add_schedule(state, catchup="all", at_ms=0)
    schedule = state.schedules["s"]
    assert plan_ticks(schedule, 11_000) == [(t, True) for t in range(2000, 11_000, 2000)]
    long_after = plan_ticks(schedule, 10**7)
    assert len(long_after) == MAX_TICKS_PER_ROUND
    assert [t for t, _ in long_after] == list(range(2000, 2000 * (MAX_TICKS_PER_ROUND + 1), 2000))
    assert plan_ticks(schedule, 1999) == []


def test_catchup_one_fires_only_the_latest_missed_tick() -> None:
    state = a_mesh()
    add_schedule(state, catchup="one", at_ms=0)
    assert plan_ticks(state.schedules["s"], 11_999) == [(10_000, True)]
    fire(state, 10_000, at_ms=11_999)
    assert plan_ticks(state.schedules["s"], 11_999) == []
    assert list(schedule_runs(state)) == [tick_key("s", 10_000)]


def test_catchup_none_fires_an_on_time_tick_and_drops_a_late_one() -> None:
    """On time is within half a period (at least 1 s): here 1 s."""
    state = a_mesh()
    add_schedule(state, catchup="none", at_ms=0)
    assert plan_ticks(state.schedules["s"], 10_900) == [(10_000, True)]
    assert plan_ticks(state.schedules["s"], 11_500) == [(10_000, False)]
    result = fire(state, 10_000, at_ms=11_500, go=False)
    assert result == res.TickFired(run=None, skipped="missed; the catch-up policy drops it")
    assert schedule_runs(state) == {} and state.schedules["s"].skipped == 1
    assert plan_ticks(state.schedules["s"], 12_100) == [(12_000, True)]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 10**9),
    st.integers(0, 10**6),
    st.sampled_from([1000, 2000, 5000, 60_000]),
)
def test_catchup_plans_agree(last: int, gap: int, every_ms: int) -> None:
    """ "all" lists the grid points in (last, now] from the first on; "one"
    and "none" name the latest of them; nothing is planned before a tick is due."""
    state = a_mesh()
    plans = {}
    for catchup in ("all", "one", "none"):
        add_schedule(state, catchup, every_ms=every_ms, catchup=catchup, at_ms=last)
        plans[catchup] = plan_ticks(state.schedules[catchup], last + gap)
    every = [t for t, _ in plans["all"]]
    assert all(go for _, go in plans["all"])
    assert every == sorted(set(every))
    assert all(last < t <= last + gap and t % every_ms == 0 for t in every)
    if not every:
        assert plans["one"] == plans["none"] == []
        assert (last + gap) // every_ms == last // every_ms
        return
    assert every[0] == (last // every_ms + 1) * every_ms
    latest = (last + gap) - (last + gap) % every_ms
    assert plans["one"] == [(latest, True)]
    assert [t for t, _ in plans["none"]] == [latest]
    if len(every) < MAX_TICKS_PER_ROUND:
        assert every[-1] == latest


def test_cron_with_seconds_and_a_time_zone() -> None:
    """A 6th field is seconds (croniter's convention); a cron is read in its
    own zone, so 09:00 in Paris is 08:00 UTC in winter and 07:00 in summer."""
    every_2s = parse_when("* * * * * */2", None, None)
    assert next_tick(every_2s, 10_000) == 12_000
    assert latest_tick(every_2s, 13_999) == 12_000
    assert latest_tick(every_2s, 12_000) == 12_000
    paris = parse_when("0 9 * * *", None, "Europe/Paris")
    winter = int(datetime(2026, 1, 15, 12, tzinfo=UTC).timestamp() * 1000)
    summer = int(datetime(2026, 7, 15, 12, tzinfo=UTC).timestamp() * 1000)
    assert datetime.fromtimestamp(next_tick(paris, winter) / 1000, UTC) == datetime(
        2026, 1, 16, 8, tzinfo=UTC
    )
    assert datetime.fromtimestamp(next_tick(paris, summer) / 1000, UTC) == datetime(
        2026, 7, 16, 7, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("cron", "every_s", "timezone"),
    [
        ("61 * * * *", None, None),
        ("not cron", None, None),
        ("* * *", None, None),
        (None, None, None),
        ("* * * * *", 2.0, None),
        (None, 0.5, None),
        (None, 2.0, "Mars/Olympus"),
        (None, 2.0, "../etc/passwd"),
    ],
)
def test_bad_timings_are_refused(
    cron: str | None, every_s: float | None, timezone: str | None
) -> None:
    with pytest.raises(BadSchedule):
        parse_when(cron, every_s, timezone)


# -- overlap ---------------------------------------------------------------------


def _finish(state: MeshState, run_id: str) -> None:
    epoch = state.runs[run_id].epoch + 1
    assert apply(state, c.Assign(cid(), T0, 1, [(run_id, "p1", epoch)])).accepted == [run_id]
    assert apply(state, c.Finish(cid(), T0, run_id, epoch, "succeeded", None)).ok


def test_overlap_skip_records_the_tick_while_the_previous_run_is_active() -> None:
    state = a_mesh()
    add_schedule(state, overlap="skip")
    first, second, third = TICKS[:3]
    assert fire(state, first).run == tick_run_id("s", first)
    skipped = fire(state, second)
    assert skipped.run is None and "still active" in skipped.skipped
    _finish(state, tick_run_id("s", first))
    assert fire(state, third).run == tick_run_id("s", third)
    assert sorted(schedule_runs(state)) == [tick_key("s", third)]
    assert (state.schedules["s"].fired, state.schedules["s"].skipped) == (2, 1)


def test_overlap_allow_starts_a_run_every_tick() -> None:
    state = a_mesh()
    add_schedule(state, overlap="allow")
    for tick in TICKS[:3]:
        assert fire(state, tick).run == tick_run_id("s", tick)
    assert len(schedule_runs(state)) == 3


def test_overlap_cancel_previous_cancels_the_previous_run_and_starts_the_next() -> None:
    state = a_mesh()
    add_schedule(state, overlap="cancel_previous")
    first, second, third = (tick_run_id("s", t) for t in TICKS[:3])
    fire(state, TICKS[0])
    assert fire(state, TICKS[1]).run == second
    # queued: cancelled at once (settling as cancelled until storage has it)
    assert state.runs[first].status == RunStatus.SETTLING
    assert state.runs[first].outcome == RunStatus.CANCELLED
    epoch = state.runs[second].epoch + 1
    apply(state, c.Assign(cid(), T0, 1, [(second, "p1", epoch)]))
    assert fire(state, TICKS[2]).run == third
    # running: its owner is asked to stop
    assert state.runs[second].status == RunStatus.RUNNING
    assert state.runs[second].cancel_requested
    assert state.runs[third].status == RunStatus.QUEUED
    consistent(state)


def test_a_refused_run_skips_its_tick() -> None:
    """A full tenant queue refuses the tick's run: the tick is dropped (not
    retried forever) and says why."""
    state = a_mesh()
    apply(state, c.Configure(cid(), T0, {}, None, {"t1": 0}, None))
    add_schedule(state)
    result = fire(state, TICKS[0])
    assert result.run is None and "refused" in result.skipped
    assert schedule_runs(state) == {} and state.schedules["s"].last_tick_ms == TICKS[0]


# -- the other schedule commands -------------------------------------------------


def test_set_is_idempotent_for_one_definition_and_conflicts_for_another() -> None:
    state = a_mesh()
    assert add_schedule(state) == res.ScheduleSaved(created=True)
    assert add_schedule(state, at_ms=T0 + 5000) == res.ScheduleSaved(created=False)
    assert state.schedules["s"].created_at_ms == T0
    other = add_schedule(state, overlap="skip")
    assert isinstance(other, res.Rejected) and other.reason == res.Rejection.CONFLICT
    for bad in (
        add_schedule(state, "t", every_ms=None, cron=None),
        add_schedule(state, "t\n"),
        add_schedule(state, "t/u"),
        add_schedule(state, "t", every_ms=999),
        add_schedule(state, "t", overlap="sometimes"),
    ):
        assert isinstance(bad, res.Rejected) and bad.reason == res.Rejection.INVALID, bad


def test_pause_stops_ticks_and_resume_drops_those_due_meanwhile() -> None:
    state = a_mesh()
    add_schedule(state)
    assert apply(state, c.SchedulePause(cid(), T0, "s")).ok
    paused = fire(state, TICKS[0])
    assert isinstance(paused, res.Rejected) and paused.reason == res.Rejection.CONFLICT
    assert ScheduleTicker().due(state, TICKS[3]) == []
    assert apply(state, c.ScheduleResume(cid(), TICKS[3] + 1, "s")).ok
    assert fire(state, TICKS[2], at_ms=TICKS[3] + 2).reason == res.Rejection.CONFLICT
    assert fire(state, TICKS[4]).run == tick_run_id("s", TICKS[4])


def test_delete_forgets_the_schedule_and_keeps_its_runs() -> None:
    state = a_mesh()
    add_schedule(state)
    fire(state, TICKS[0])
    assert apply(state, c.ScheduleDelete(cid(), T0, "s")).ok
    assert "s" not in state.schedules and len(schedule_runs(state)) == 1
    for cmd in (
        c.ScheduleDelete(cid(), T0, "s"),
        c.SchedulePause(cid(), T0, "s"),
        c.ScheduleResume(cid(), T0, "s"),
        c.FireTick(cid(), TICKS[1], "s", TICKS[1]),
    ):
        result = apply(state, cmd)
        assert isinstance(result, res.Rejected) and result.reason == res.Rejection.UNKNOWN_SCHEDULE


def test_a_tick_in_the_future_is_refused() -> None:
    state = a_mesh()
    add_schedule(state)
    early = fire(state, TICKS[1], at_ms=TICKS[1] - 1)
    assert isinstance(early, res.Rejected) and early.reason == res.Rejection.INVALID
    assert state.schedules["s"].last_tick_ms == T0


# -- totality and snapshots ----------------------------------------------------


def _schedule_commands(data: st.DataObject, at: int) -> Any:
    base = data.draw(
        st.sampled_from(
            [
                c.ScheduleSet("x", at, "n", None, 2000, "UTC", "echo", 1, "t1", "skip", "all"),
                c.ScheduleSet(
                    "x", at, "n", "* * * * *", None, "UTC", "echo", 1, "t", "allow", "one"
                ),
                c.ScheduleDelete("x", at, "s"),
                c.SchedulePause("x", at, "s"),
                c.ScheduleResume("x", at, "s"),
                c.FireTick("x", at, "s", TICKS[0]),
                c.FireTick("x", at, "s", TICKS[1], False),
            ]
        ),
        label="command",
    )
    cmd = base.to_wire()
    fields = [k for k in cmd if k != "op"]
    for name in data.draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
        cmd[name] = data.draw(VALUES, label=name)
    return cmd


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_schedule_commands_with_arbitrary_fields_are_answered(data: st.DataObject) -> None:
    """Like tests/test_apply_total.py for the schedule commands: whatever a
    field carries, apply answers (never raises), and the state still
    snapshots and keeps its indexes."""
    state = a_mesh()
    add_schedule(state, overlap=data.draw(st.sampled_from(["skip", "allow", "cancel_previous"])))
    for i in range(data.draw(st.integers(1, 5))):
        cmd = _schedule_commands(data, TICKS[-1] + i)
        cmd["cid"] = cmd["cid"] if not isinstance(cmd.get("cid"), str) else f"c{i}"
        result = state.apply(cmd)  # must not raise
        assert isinstance(result, tuple(res.Result.__args__)), result
        consistent(state)
    assert snapshot_roundtrip(state).to_dict() == state.to_dict()


def test_snapshot_roundtrip_carries_schedules_and_loads_older_ones() -> None:
    state = a_mesh()
    add_schedule(state, overlap="skip", catchup="one")
    add_schedule(state, "cron", every_ms=None, cron="*/5 * * * *", tenant="t2")
    fire(state, TICKS[0])
    apply(state, c.SchedulePause(cid(), T0, "cron"))
    restored = snapshot_roundtrip(state)
    assert restored.to_dict() == state.to_dict()
    assert restored.schedules == state.schedules
    # a replica restored from it stays in lockstep
    for replica in (state, restored):
        assert fire(replica, TICKS[1]) == res.TickFired(
            run=None, skipped=f"run {tick_run_id('s', TICKS[0])} is still active"
        )
    older = msgpack.unpackb(msgpack.packb(state.to_dict()), raw=False, strict_map_key=False)
    del older["schedules"]
    assert MeshState.from_dict(older).schedules == {}


def test_random_logs_replay_to_the_same_state() -> None:
    """Replaying one log of schedule commands on a fresh state gives the same
    results and the same state: nothing in apply reads a clock."""
    rng = random.Random(11)
    log: list[c.Command] = [c.PeerUp("up", T0, "p1", "i1", "r1", "h1", 4, {})]
    for name in ("a", "b"):
        log.append(
            c.ScheduleSet(cid(), T0, name, None, EVERY_MS, "UTC", "echo", None, "t", "skip", "all")
        )
    for _ in range(200):
        tick = rng.choice(TICKS)
        log.append(c.FireTick(cid(), tick + rng.randrange(3000), rng.choice("ab"), tick))
        if rng.random() < 0.1:
            log.append(
                rng.choice([c.SchedulePause, c.ScheduleResume])(cid(), tick, rng.choice("ab"))
            )
    first, second = MeshState(), MeshState()
    answers = [first.apply(wire(cmd)) for cmd in log]
    assert [second.apply(wire(cmd)) for cmd in log] == answers
    assert first.to_dict() == second.to_dict()


# -- a state machine over schedules, runs and leaders ----------------------------


class ScheduleMachine(RuleBasedStateMachine):
    """Random interleavings of schedule commands, ticks proposed by leaders
    planning on states of any age, and the runs' own lives (assigned,
    finished, cancelled). Whatever happens, a tick fires at most once per
    schedule, ticks only move forward, a paused schedule fires nothing, and
    the state snapshots exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.state = a_mesh()
        self.now = T0
        self.views: list[MeshState] = [copy.deepcopy(self.state)]
        self.tickers = [ScheduleTicker(), ScheduleTicker()]
        # (schedule, created_at_ms) -> ticks fired, in the order they fired
        self.fired: dict[tuple[str, int], list[int]] = {}

    def _apply(self, cmd: c.Command) -> Any:
        before = {
            k: (s.created_at_ms, s.paused, s.last_tick_ms) for k, s in self.state.schedules.items()
        }
        result = apply(self.state, cmd)
        if isinstance(cmd, c.FireTick) and isinstance(result, res.TickFired):
            created, paused, last = before[cmd.schedule]
            assert not paused, "a paused schedule fired"
            assert cmd.tick_ms > last
            if result.run is not None:
                ticks = self.fired.setdefault((cmd.schedule, created), [])
                assert cmd.tick_ms not in ticks, "a tick fired twice"
                ticks.append(cmd.tick_ms)
                run = self.state.runs[result.run]
                assert run.spec.idempotency_key == tick_key(cmd.schedule, cmd.tick_ms)
                assert run.spec.tenant == self.state.schedules[cmd.schedule].tenant
        return result

    @rule(
        name=st.sampled_from(["a", "b"]),
        every_ms=st.sampled_from([1000, 2000]),
        overlap=st.sampled_from(["skip", "allow", "cancel_previous"]),
        catchup=st.sampled_from(["none", "one", "all"]),
    )
    def set_schedule(self, name: str, every_ms: int, overlap: str, catchup: str) -> None:
        self._apply(
            c.ScheduleSet(
                cid(), self.now, name, None, every_ms, "UTC", "echo", None, "t", overlap, catchup
            )
        )

    @rule(step_ms=st.sampled_from([300, 1000, 2500, 9000]))
    def clock(self, step_ms: int) -> None:
        self.now += step_ms

    @rule(which=st.integers(0, 1), age=st.integers(0, 3))
    def lead(self, which: int, age: int) -> None:
        """A leader plans on the committed state or an older copy of it."""
        view = self.views[max(0, len(self.views) - 1 - age)]
        for cmd in self.tickers[which].due(view, self.now):
            self._apply(cmd)
        self.views.append(copy.deepcopy(self.state))

    @rule(name=st.sampled_from(["a", "b"]), op=st.sampled_from(["pause", "resume", "delete"]))
    def operate(self, name: str, op: str) -> None:
        kind = {"pause": c.SchedulePause, "resume": c.ScheduleResume, "delete": c.ScheduleDelete}
        self._apply(kind[op](cid(), self.now, name))

    @rule(data=st.data())
    def run_moves(self, data: st.DataObject) -> None:
        if not self.state.runs:
            return
        run = self.state.runs[data.draw(st.sampled_from(sorted(self.state.runs)))]
        if run.status == RunStatus.QUEUED:
            self._apply(c.Assign(cid(), self.now, 1, [(run.id, "p1", run.epoch + 1)]))
        elif run.status == RunStatus.RUNNING:
            self._apply(c.Finish(cid(), self.now, run.id, run.epoch, "succeeded", None))
        elif run.status == RunStatus.SETTLING:
            self._apply(c.Settle(cid(), self.now, run.id))

    @invariant()
    def consistent_and_snapshots(self) -> None:
        consistent(self.state)
        assert snapshot_roundtrip(self.state).to_dict() == self.state.to_dict()


TestScheduleMachine = ScheduleMachine.TestCase
TestScheduleMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
