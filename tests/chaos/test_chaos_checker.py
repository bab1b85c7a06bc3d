"""The checker catches each invariant's violation in a hand-built history.

A clean two-run history passes; each test then breaks exactly one invariant
the way a real bug would show up (a lost run, a stale write, a changed
outcome, a repeated step, a duplicate key, an oversubscribed peer, a stranded
failover) and asserts that invariant, and only it, fails with a
counter-example naming the run.
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
    Fault,
    History,
    Observation,
    PeerLoad,
    StorageSnapshot,
    StoredRun,
    StoredWrite,
    SubmitOp,
)
from raftmesh.chaos.ledger import (
    ATTEMPT_END,
    ATTEMPT_START,
    STEP_END,
    STEP_START,
    LedgerEntry,
    LedgerWriter,
    read_ledger,
)

T0 = 1_000_000


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
            T0 + 1000, "peer-1", "peer-1", (PeerLoad("peer-1", 4, 1, "up"),), {"alpha": (1, 2)}
        )
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
        },
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


def failed(verdict) -> dict[int, list[str]]:
    return {i.number: i.violations for i in verdict.invariants if not i.passed}


def test_clean_history_passes_and_measures_the_failover() -> None:
    verdict = check(*clean())
    assert failed(verdict) == {}
    assert verdict.passed
    assert verdict.acknowledged == 2 and verdict.completed == 2
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
