"""The checker catches each invariant's violation in a hand-built history.

A clean history passes (two runs, a run that took two signals, one of them
sent twice, and a schedule's three ticks); each test then breaks exactly one
invariant the way a real bug would show up (a lost run, a stale write, a
changed outcome, a repeated step, a duplicate key, an oversubscribed peer, a
stranded failover, a signal lost, reordered or consumed twice, a tick missed
or fired twice, a waiting run with an owner or a slot) and asserts that
invariant, and only it, fails with a counter-example naming the run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from raftmesh.chaos.checker import check, percentiles, submission_outages
from raftmesh.chaos.history import (
    FAIL,
    INFO,
    OK,
    ClusterSample,
    Delivery,
    Fault,
    History,
    Observation,
    ParkedRun,
    PeerLoad,
    ScheduleRecord,
    SignalOp,
    StorageSnapshot,
    StoredRun,
    StoredSignal,
    StoredWrite,
    SubmitOp,
)
from raftmesh.chaos.ledger import (
    ATTEMPT_END,
    ATTEMPT_START,
    ATTEMPT_SUSPEND,
    STEP_END,
    STEP_START,
    LedgerEntry,
    LedgerWriter,
    read_ledger,
)
from raftmesh.consensus.schedules import tick_key

T0 = 1_000_000
EVERY_MS = 2000
# The schedule is created at +100 and deleted at +10000: it owes the ticks at
# +2000, +4000 and +6000 (those at +8000 and +10000 are within the margin).
TICKS = (T0 + 2000, T0 + 4000, T0 + 6000)


def entry(kind: str, run: str, epoch: int, peer: str, seq: int, at: int) -> LedgerEntry:
    return LedgerEntry(kind, run, epoch, peer, seq, T0 + at)


def clean() -> tuple[History, list[LedgerEntry], StorageSnapshot]:
    """r1 runs on peer-1 undisturbed; r2 loses its owner peer-2 to a pause at
    +2000 ms after step 0 was checkpointed and resumes on peer-3 at +4000 ms."""
    history = History(start_ms=T0, end_ms=T0 + 10_000)
    history.submits = [
        SubmitOp("k1", "peer-1", T0 + 10, T0 + 50, OK, "r1"),
        SubmitOp("k2", "peer-2", T0 + 60, T0 + 90, INFO, None, "503 no_quorum"),
        SubmitOp("k2", "peer-3", T0 + 100, T0 + 150, OK, "r2"),
    ]
    history.faults = [Fault("pause", "SIGSTOP", T0 + 2000, T0 + 5000, ("peer-2",), ("peer-2",))]
    history.samples = [
        ClusterSample(
            T0 + 1000,
            "peer-1",
            "peer-1",
            (PeerLoad("peer-1", 4, 1, "up"),),
            {"alpha": (1, 2)},
            runs={"queued": 0, "running": 1, "waiting": 1, "paused": 0},
            parked=(ParkedRun("s1", "waiting", None),),
        )
    ]
    history.signals = [
        signal_op("k0", 0, T0 + 1100, peer="peer-2", outcome=INFO, seq=None),  # timed out
        signal_op("k0", 0, T0 + 1300),
        signal_op("k1", 1, T0 + 2300),
        signal_op("k1", 1, T0 + 2500, deliberate=True),
    ]
    history.schedules = [
        ScheduleRecord("ticks", EVERY_MS, "all", "allow", "gamma", T0 + 100, T0 + 10_000, 3, 0)
    ]
    ledger = [
        entry(ATTEMPT_START, "r1", 1, "peer-1", -1, 200),
        entry(STEP_START, "r1", 1, "peer-1", 0, 210),
        entry(STEP_END, "r1", 1, "peer-1", 0, 600),
        entry(STEP_START, "r1", 1, "peer-1", 1, 620),
        entry(STEP_END, "r1", 1, "peer-1", 1, 1000),
        entry(ATTEMPT_END, "r1", 1, "peer-1", -1, 1010),
        entry(ATTEMPT_START, "r2", 1, "peer-2", -1, 300),
        entry(STEP_START, "r2", 1, "peer-2", 0, 310),
        entry(STEP_END, "r2", 1, "peer-2", 0, 700),
        entry(STEP_START, "r2", 1, "peer-2", 1, 720),  # paused in this step
        entry(ATTEMPT_START, "r2", 2, "peer-3", -1, 4000),
        entry(STEP_START, "r2", 2, "peer-3", 1, 4010),  # step 1 was never checkpointed
        entry(STEP_END, "r2", 2, "peer-3", 1, 4400),
        entry(ATTEMPT_END, "r2", 2, "peer-3", -1, 4410),
    ]
    result1 = '{"epoch":1}'
    result2 = '{"epoch":2}'
    storage = StorageSnapshot(
        runs={
            "r1": StoredRun("r1", "succeeded", 1, "peer-1", "k1", result1, 1, T0 + 1020),
            "r2": StoredRun("r2", "succeeded", 2, "peer-3", "k2", result2, 2, T0 + 4420),
            "s1": StoredRun(
                "s1", "succeeded", 2, "peer-1", "ks", signals_result(0, 1), None, T0 + 3000
            ),
            **{f"t{i}": tick_run(f"t{i}", tick) for i, tick in enumerate(TICKS)},
        },
        signals=[
            StoredSignal("s1", "go", 0, "k0", data(0)),
            StoredSignal("s1", "go", 1, "k1", data(1)),
        ],
        deliveries=[Delivery("s1", "go", 0, 0, data(0)), Delivery("s1", "go", 1, 1, data(1))],
        steps=[
            StoredWrite("r1", 0, 1, T0 + 600, "peer-1"),
            StoredWrite("r1", 1, 1, T0 + 1000, "peer-1"),
            StoredWrite("r2", 0, 1, T0 + 700, "peer-2"),
            StoredWrite("r2", 1, 2, T0 + 4400, "peer-3"),
        ],
        events=[
            StoredWrite("r1", 1, 1, T0 + 601),
            StoredWrite("r1", 2, 1, T0 + 1001),
            StoredWrite("r2", 1, 1, T0 + 701),
            StoredWrite("r2", 2, 2, T0 + 4401),
        ],
    )
    history.observations = [
        Observation("r1", T0 + 1500, "succeeded", result1),
        Observation("r2", T0 + 3000, "running"),
        Observation("r2", T0 + 5000, "succeeded", result2),
    ]
    return history, ledger, storage


def data(index: int) -> str:
    return f'{{"index":{index},"key":"k{index}"}}'


def signals_result(*indexes: int) -> str:
    return '{"epoch":2,"signals":[' + ",".join(data(i) for i in indexes) + "]}"


def signal_op(
    key: str,
    index: int,
    at: int,
    peer: str = "peer-1",
    outcome: str = OK,
    seq: int | None = -1,
    deliberate: bool = False,
) -> SignalOp:
    """An attempt to send s1 signal go ``key``; acknowledged as seq ``index``
    unless ``seq`` is given."""
    return SignalOp(
        "s1",
        "go",
        key,
        data(index),
        peer,
        at - 20,
        at,
        outcome,
        index if seq == -1 else seq,
        deliberate if outcome == OK else None,
        deliberate,
    )


def tick_run(run_id: str, tick: int) -> StoredRun:
    return StoredRun(
        run_id, "succeeded", 1, "peer-2", tick_key("ticks", tick), None, None, tick + 900
    )


def failed(verdict) -> dict[int, list[str]]:
    return {i.number: i.violations for i in verdict.invariants if not i.passed}


def test_clean_history_passes_and_measures_the_failover() -> None:
    verdict = check(*clean())
    assert failed(verdict) == {}
    assert verdict.passed
    assert verdict.acknowledged == 2 and verdict.completed == 2
    assert [i.checked for i in verdict.invariants[7:]] == [3, 3, 2]
    waits = verdict.waits
    assert (waits.signals_acked, waits.signals_resent, waits.signals_delivered) == (2, 1, 2)
    assert (waits.ticks_owed, waits.ticks_fired, waits.parked_seen) == (3, 3, 1)
    [fo] = verdict.failovers
    assert (fo.run_id, fo.peer, fo.new_peer, fo.duration_ms) == ("r2", "peer-2", "peer-3", 2000)
    assert verdict.failover_percentiles()["max"] == 2000


def test_1_an_acknowledged_run_that_never_finishes_is_lost() -> None:
    history, ledger, storage = clean()
    history.submits.append(SubmitOp("k3", "peer-1", T0 + 200, T0 + 250, OK, "r3"))
    history.observations.append(Observation("r3", T0 + 9000, "queued"))
    assert list(failed(check(history, ledger, storage))) == [1]
    assert "r3" in failed(check(history, ledger, storage))[1][0]
    storage.runs["r1"] = dataclasses.replace(storage.runs["r1"], status="running")
    history.observations = [o for o in history.observations if o.run_id != "r1"]
    assert len(failed(check(history, ledger, storage))[1]) == 2


def test_2_a_write_by_a_stale_epoch_after_the_new_claim_is_caught() -> None:
    history, ledger, storage = clean()
    # peer-2 wakes at +5000 and its unfenced event lands after epoch 2's.
    storage.events.append(StoredWrite("r2", 3, 1, T0 + 5001))
    violations = failed(check(history, ledger, storage))
    assert list(violations) == [2]
    assert any("stale epoch 1" in v and "epoch 2 had claimed" in v for v in violations[2])
    assert any("event 3 carries epoch 1 after an event of epoch 2" in v for v in violations[2])


def test_2_a_stale_step_checkpoint_and_result_are_caught() -> None:
    history, ledger, storage = clean()
    storage.steps.append(StoredWrite("r2", 2, 1, T0 + 5002, "peer-2"))
    storage.runs["r2"] = dataclasses.replace(
        storage.runs["r2"], result_epoch=1, finished_at_ms=T0 + 5003
    )
    violations = failed(check(history, ledger, storage))[2]
    assert any("step 2 written by stale epoch 1 on peer-2" in v for v in violations)
    assert any("result of stale epoch 1" in v for v in violations)


def test_2_a_stale_write_before_the_new_claim_is_legitimate() -> None:
    history, ledger, storage = clean()
    storage.events.append(StoredWrite("r2", 0, 1, T0 + 3990))
    storage.events.sort(key=lambda w: (w.run_id, w.seq))
    assert failed(check(history, ledger, storage)) == {}


def test_3_two_terminal_outcomes_for_one_run() -> None:
    history, ledger, storage = clean()
    history.observations.append(Observation("r1", T0 + 8000, "failed", None, "api:peer-3"))
    violations = failed(check(history, ledger, storage))
    assert list(violations) == [3]
    assert "r1 has 2 terminal outcomes" in violations[3][0]


def test_3_a_result_that_changes_is_a_second_outcome() -> None:
    history, ledger, storage = clean()
    storage.runs["r1"] = dataclasses.replace(storage.runs["r1"], result='{"epoch":9}')
    assert list(failed(check(history, ledger, storage))) == [3]


def test_4_a_checkpointed_step_executed_again_by_a_newer_epoch() -> None:
    history, ledger, storage = clean()
    ledger.append(entry(STEP_START, "r2", 2, "peer-3", 0, 4005))
    violations = failed(check(history, ledger, storage))
    assert list(violations) == [4]
    assert "step 0 checkpointed by epoch 1" in violations[4][0]
    assert "executed again by epoch 2 on peer-3" in violations[4][0]


def test_4_a_step_executed_twice_within_one_epoch() -> None:
    history, ledger, storage = clean()
    ledger.append(entry(STEP_START, "r1", 1, "peer-1", 1, 630))
    assert "executed 2 times by epoch 1" in failed(check(history, ledger, storage))[4][0]


def test_5_one_key_acknowledged_as_two_runs() -> None:
    history, ledger, storage = clean()
    history.submits.append(SubmitOp("k1", "peer-2", T0 + 300, T0 + 320, OK, "r9"))
    violations = failed(check(history, ledger, storage))
    assert 5 in violations and "key k1 acknowledged as runs ['r1', 'r9']" in violations[5]


def test_5_one_key_stored_as_two_runs() -> None:
    history, ledger, storage = clean()
    storage.runs["r7"] = StoredRun("r7", "succeeded", 1, "peer-1", "k1", None, None, None)
    violations = failed(check(history, ledger, storage))
    assert list(violations) == [5]
    assert "2 runs in storage" in violations[5][0]


def test_6_a_peer_over_its_slots_and_a_tenant_over_its_cap() -> None:
    history, ledger, storage = clean()
    history.samples.append(
        ClusterSample(
            T0 + 2000, "peer-3", "peer-1", (PeerLoad("peer-1", 4, 5, "up"),), {"alpha": (3, 2)}
        )
    )
    violations = failed(check(history, ledger, storage))
    assert list(violations) == [6]
    assert any("peer-1 runs 5 > 4 slots" in v for v in violations[6])
    assert any("tenant alpha runs 3 > cap 2" in v for v in violations[6])


def test_7_a_failover_beyond_the_bound_and_one_that_never_happens() -> None:
    history, ledger, storage = clean()
    assert failed(check(history, ledger, storage, failover_bound_ms=1500)) == {
        7: [
            "run r2 lost its owner peer-2 at 1002000 (pause (SIGSTOP)); resumed on peer-3 "
            "after 2000 ms > 1500 ms"
        ]
    }
    stranded = [e for e in ledger if not (e.run_id == "r2" and e.epoch == 2)]
    storage.runs["r2"] = dataclasses.replace(
        storage.runs["r2"], status="running", epoch=1, result=None, finished_at_ms=None
    )
    storage.steps = [w for w in storage.steps if w.epoch == 1]
    storage.events = [w for w in storage.events if w.epoch == 1]
    history.observations = [o for o in history.observations if o.run_id != "r2"]
    violations = failed(check(history, stranded, storage))
    assert sorted(violations) == [1, 7]
    assert "never resumed" in violations[7][0]


def test_7_a_failover_overlapping_another_fault_is_measured_not_held() -> None:
    history, ledger, storage = clean()
    history.faults.append(Fault("db", "refuse", T0 + 2500, T0 + 3500))
    verdict = check(history, ledger, storage, failover_bound_ms=1500)
    assert verdict.passed
    assert verdict.failovers[0].overlapped and verdict.failovers[0].duration_ms == 2000


def test_a_paused_owner_that_finishes_itself_needs_no_failover() -> None:
    history, ledger, storage = clean()
    ledger = [e for e in ledger if not (e.run_id == "r2" and e.epoch == 2)]
    ledger.append(entry(ATTEMPT_END, "r2", 1, "peer-2", -1, 5100))
    assert check(history, ledger, storage).failovers == []


def test_submission_outages_span_failures_between_acknowledgements() -> None:
    history = History(start_ms=0, end_ms=20_000)
    history.submits = [
        SubmitOp("a", "p", 0, 100, OK, "1"),
        SubmitOp("b", "p", 200, 4200, INFO),
        SubmitOp("b", "p", 4300, 4400, FAIL),
        SubmitOp("b", "p", 4500, 5100, OK, "2"),
        SubmitOp("c", "p", 5200, 5300, OK, "3"),
        SubmitOp("d", "p", 5400, 5600, FAIL),
        SubmitOp("d", "p", 5700, 5800, OK, "4"),
    ]
    windows = submission_outages(history, min_ms=1000)
    assert [(w.start_ms, w.end_ms) for w in windows] == [(100, 5100)]


def test_percentiles_are_nearest_rank() -> None:
    p = percentiles(range(1, 101))
    assert (p["p50"], p["p95"], p["p99"], p["max"]) == (50, 95, 99, 100)
    assert percentiles([]) == {}


def test_history_and_ledger_round_trip(tmp_path: Path) -> None:
    history, ledger, _ = clean()
    history.save(tmp_path / "h.jsonl")
    assert History.load(tmp_path / "h.jsonl") == history
    writer = LedgerWriter(tmp_path, "r1", 1, "peer-1")
    for e in ledger[:3]:
        writer.append(e)
    writer.close()
    with open(tmp_path / "torn.jsonl", "w") as fh:
        fh.write('{"kind": "step_start", "run"')
    assert read_ledger(tmp_path) == ledger[:3]


def test_a_run_that_finished_before_its_peer_was_lost_is_no_failover() -> None:
    history, ledger, storage = clean()
    # r1 died of an error on peer-1 (no attempt_end) and was stored as failed;
    # losing peer-1 later must not count it as a failover that never happens.
    ledger = [e for e in ledger if not (e.run_id == "r1" and e.kind == ATTEMPT_END)]
    storage.runs["r1"] = dataclasses.replace(storage.runs["r1"], status="failed", result=None)
    history.observations = [o for o in history.observations if o.run_id != "r1"]
    history.faults.append(Fault("kill", "kill -9", T0 + 6000, T0 + 7000, ("peer-1",), ("peer-1",)))
    verdict = check(history, ledger, storage)
    assert [f.run_id for f in verdict.failovers] == ["r2"]
    assert verdict.passed


def test_a_run_whose_lost_owner_had_stored_its_outcome_needs_no_failover() -> None:
    history, ledger, storage = clean()
    # r2's epoch-1 attempt timed out (no attempt_end) and stored timed_out at
    # +2100, just after peer-2 was paused; a newer epoch only reports it.
    ledger = [e for e in ledger if not (e.run_id == "r2" and e.epoch == 2)]
    storage.runs["r2"] = dataclasses.replace(
        storage.runs["r2"],
        status="timed_out",
        result=None,
        result_epoch=None,
        finished_at_ms=T0 + 2100,
    )
    storage.steps = [w for w in storage.steps if w.epoch == 1]
    storage.events = [w for w in storage.events if w.epoch == 1]
    history.observations = [o for o in history.observations if o.run_id != "r2"]
    verdict = check(history, ledger, storage)
    assert verdict.failovers == []
    assert verdict.passed


def test_8_an_acknowledged_signal_lost_from_storage_is_never_delivered() -> None:
    history, ledger, storage = clean()
    storage.signals = storage.signals[:1]
    storage.deliveries = storage.deliveries[:1]
    storage.runs["s1"] = dataclasses.replace(storage.runs["s1"], result=signals_result(0))
    violations = failed(check(history, ledger, storage))
    assert list(violations) == [8]
    assert any("key k1 acknowledged as seq 1" in v and "missing" in v for v in violations[8])
    assert any("succeeded without consuming signal go key k1" in v for v in violations[8])


def test_8_signals_consumed_out_of_order() -> None:
    history, ledger, storage = clean()
    storage.deliveries = [
        Delivery("s1", "go", 0, 0, data(1)),
        Delivery("s1", "go", 1, 1, data(0)),
    ]
    storage.runs["s1"] = dataclasses.replace(storage.runs["s1"], result=signals_result(1, 0))
    violations = failed(check(history, ledger, storage))
    assert list(violations) == [8]
    assert any("wait 0 for go consumed" in v and "out of order" in v for v in violations[8])


def test_8_a_duplicate_key_stored_and_consumed_twice() -> None:
    history, ledger, storage = clean()
    # The deliberate resend was stored again instead of answering seq 1.
    history.signals[-1] = dataclasses.replace(history.signals[-1], seq=2, duplicate=False)
    storage.signals.append(StoredSignal("s1", "go", 2, "k1", data(1)))
    storage.deliveries.append(Delivery("s1", "go", 2, 2, data(1)))
    storage.runs["s1"] = dataclasses.replace(storage.runs["s1"], result=signals_result(0, 1, 1))
    violations = failed(check(history, ledger, storage))[8]
    assert any("key k1 acknowledged under seqs [1, 2]" in v for v in violations)
    assert any("key k1 stored 2 times" in v for v in violations)
    assert any("key k1 consumed twice (waits 1 and 2)" in v for v in violations)


def test_8_a_result_that_is_not_what_the_journal_consumed() -> None:
    history, ledger, storage = clean()
    storage.runs["s1"] = dataclasses.replace(storage.runs["s1"], result=signals_result(0))
    violations = failed(check(history, ledger, storage))
    assert list(violations) == [8]
    assert "returned the signals" in violations[8][0]


def test_8_an_unacknowledged_signal_and_a_pending_one_are_no_violation() -> None:
    history, ledger, storage = clean()
    # k2 was stored and consumed though its sender never heard back: fine;
    # k3 was acknowledged but the run still waits for it at the end: not a
    # signal violation (invariant 1 judges the run).
    storage.signals += [
        StoredSignal("s1", "go", 2, "k2", data(2)),
        StoredSignal("s1", "go", 3, "k3", data(3)),
    ]
    storage.deliveries.append(Delivery("s1", "go", 2, 2, data(2)))
    history.signals.append(signal_op("k3", 3, T0 + 2800))
    storage.runs["s1"] = dataclasses.replace(storage.runs["s1"], status="waiting", result=None)
    assert 8 not in failed(check(history, ledger, storage))


def test_9_a_tick_that_never_fired() -> None:
    history, ledger, storage = clean()
    del storage.runs["t1"]
    violations = failed(check(history, ledger, storage))
    assert violations == {9: [f"schedule ticks: tick {TICKS[1]} (all catch-up) never fired"]}


def test_9_a_tick_fired_twice_and_one_off_its_period() -> None:
    history, ledger, storage = clean()
    storage.runs["t9"] = tick_run("t9", TICKS[0])
    storage.runs["t8"] = tick_run("t8", TICKS[0] + 500)
    violations = failed(check(history, ledger, storage))
    assert sorted(violations) == [5, 9]  # the same key twice is also two runs for one key
    assert any(f"tick {TICKS[0]} fired 2 runs ['t0', 't9']" in v for v in violations[9])
    assert any(f"tick {TICKS[0] + 500} fired, but its ticks fall" in v for v in violations[9])


def test_9_a_late_tick_dropped_during_a_fault_is_excused_only_if_catchup_drops() -> None:
    history, ledger, storage = clean()
    del storage.runs["t2"]  # due at +6000, while a leader kill is in force
    history.faults = [Fault("leader", "kill -9", T0 + 5500, T0 + 6500, ("peer-1",))]
    assert 9 in failed(check(history, ledger, storage))  # "all" owes it anyway
    history.schedules = [dataclasses.replace(history.schedules[0], catchup="none")]
    assert 9 not in failed(check(history, ledger, storage))
    history.faults = []
    assert 9 in failed(check(history, ledger, storage))  # no fault: no excuse


def test_9_ticks_near_the_deletion_are_not_owed() -> None:
    history, ledger, storage = clean()
    late = [tick_run("t8", T0 + 8000), tick_run("t10", T0 + 10_000)]
    assert failed(check(history, ledger, storage)) == {}
    storage.runs.update({r.id: r for r in late})
    assert failed(check(history, ledger, storage)) == {}


def test_10_a_waiting_run_with_an_owner_and_a_parked_run_holding_a_slot() -> None:
    history, ledger, storage = clean()
    history.samples.append(
        ClusterSample(
            T0 + 3000,
            "peer-2",
            "peer-1",
            (PeerLoad("peer-1", 4, 2, "up"), PeerLoad("peer-2", 4, 1, "up")),
            runs={"queued": 0, "running": 2, "waiting": 1, "paused": 1},
            parked=(ParkedRun("s1", "waiting", None), ParkedRun("r9", "paused", "peer-2")),
        )
    )
    violations = failed(check(history, ledger, storage))
    assert list(violations) == [10]
    assert any("paused run r9 has owner peer-2" in v for v in violations[10])
    assert any("peers hold 3 slots, but only 2 runs are running" in v for v in violations[10])


def test_10_samples_that_could_not_list_parked_runs_are_noted() -> None:
    history, ledger, storage = clean()
    history.samples.append(dataclasses.replace(history.samples[0], parked=None))
    [inv] = [i for i in check(history, ledger, storage).invariants if i.number == 10]
    assert inv.passed and "1 of 2 samples could not list the parked runs" in inv.note


def test_a_suspended_attempt_whose_peer_is_lost_later_is_no_failover() -> None:
    history, ledger, storage = clean()
    # s1 waits from +1600 (its attempt on peer-2 suspended) and is woken on
    # peer-1 at +2600; peer-2 is paused at +2000 meanwhile.
    ledger += [
        entry(ATTEMPT_START, "s1", 1, "peer-2", -1, 1500),
        entry(ATTEMPT_SUSPEND, "s1", 1, "peer-2", -1, 1600),
        entry(ATTEMPT_START, "s1", 2, "peer-1", -1, 2600),
    ]
    assert [f.run_id for f in check(history, ledger, storage).failovers] == ["r2"]
    del ledger[-2]
    assert [f.run_id for f in check(history, ledger, storage).failovers] == ["r2", "s1"]
