"""A whole chaos run whose runs wait: sleepers, signal runs, parents, a
schedule, and runs an operator pauses and resumes.

Peers suspend waits of a second or more, so under kills, pauses, leader
kills and full restarts runs keep leaving their slots and being woken on
other peers; all ten invariants must hold, and the numbers must show that
each kind of wait really happened (a pass over a run with no signals would
prove nothing about invariant 8).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raftmesh.chaos.harness import ChaosConfig, run
from raftmesh.chaos.history import History
from raftmesh.chaos.workload import WorkloadSpec

pytestmark = pytest.mark.slow

PG_URL = os.environ.get("RAFTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def test_waits_signals_and_schedules_under_faults_keep_every_invariant(
    tmp_path: Path,
) -> None:
    outcome = await run(
        ChaosConfig(
            out=tmp_path,
            storage=PG_URL,
            seed=11,
            peers=3,
            duration_s=50,
            faults=("kill", "pause", "leader", "restart"),
            slots=3,
            workload=WorkloadSpec(
                clients=3,
                rate_per_s=3.0,
                sleep_fraction=0.2,
                signal_fraction=0.2,
                parent_fraction=0.15,
            ),
            drain_s=60,
        )
    )
    print(outcome.report)
    verdict = outcome.verdict
    assert outcome.nemesis_errors == []
    assert verdict.passed, outcome.report
    assert [i.number for i in verdict.invariants] == list(range(1, 11))
    assert verdict.completed == verdict.acknowledged
    waits = verdict.waits
    assert waits.sleepers > 0 and waits.parents > 0 and waits.children >= 2 * waits.parents
    assert waits.signal_runs > 0 and waits.signals_acked > 0
    assert waits.signals_delivered >= waits.signals_acked
    assert waits.signals_resent > 0, "no key was sent twice on purpose"
    assert waits.ticks_owed > 10 and waits.ticks_fired >= waits.ticks_owed
    assert waits.parked_seen > 0, "no sample listed a waiting run"
    assert waits.pauses_acked > 0 and waits.paused_seen > 0, "no paused run was sampled"
    checked = {i.number: i.checked for i in verdict.invariants}
    assert checked[8] == waits.signals_acked + waits.signals_resent
    assert checked[9] == waits.ticks_owed
    history = History.load(tmp_path / "history.jsonl")
    [schedule] = history.schedules
    assert schedule.deleted_ms is not None and schedule.fired is not None
    assert any(s.runs.get("waiting") for s in history.samples)
    report = (tmp_path / "report.txt").read_text()
    assert "PASS  10. waiting and paused runs hold no slot and no owner" in report
    assert json.loads((tmp_path / "verdict.json").read_text())["waits"]["signals_acked"] > 0
