"""Log formats, the observer's caches and ``mesh top``'s frame, without processes."""

from __future__ import annotations

import json
import logging

from rich.console import Console

from raftmesh.cli.top import render, sparkline
from raftmesh.consensus import commands
from raftmesh.consensus import results as res
from raftmesh.consensus.model import Run
from raftmesh.consensus.spec import RunSpec
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.status import RunStatus
from raftmesh.mesh import logs
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.observe import CHURN_WINDOW_MS, THROUGHPUT_BUCKET_MS, Failovers, Observer

RUN_ID = "0123456789abcdef0123456789abcdef"


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(
        "raftmesh.test", logging.INFO, __file__, 1, "run %s", ("started",), None
    )
    rec.__dict__.update(extra)
    return rec


def test_json_lines_by_default_and_logfmt_at_a_terminal() -> None:
    assert isinstance(logs.formatter_for("auto", "p1", is_tty=False), logs.JSONFormatter)
    assert isinstance(logs.formatter_for("auto", "p1", is_tty=True), logs.LogfmtFormatter)
    assert isinstance(logs.formatter_for("json", "p1", is_tty=True), logs.JSONFormatter)


def test_a_runs_lines_carry_peer_run_epoch_and_its_trace_id() -> None:
    line = json.loads(logs.JSONFormatter("p1").format(record(run_id=RUN_ID, epoch=4)))
    assert line["peer"] == "p1" and line["run_id"] == RUN_ID and line["epoch"] == 4
    assert line["trace_id"] == RUN_ID
    assert line["msg"] == "run started"
    text = logs.LogfmtFormatter("p1").format(record(run_id=RUN_ID, epoch=4))
    assert f"run_id={RUN_ID} epoch=4" in text and 'msg="run started"' in text
    assert f"trace_id={RUN_ID}" in text


def test_a_requests_traceparent_wins_over_the_run_id() -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert logs.trace_id_from(f"00-{trace}-00f067aa0ba902b7-01") == trace
    assert logs.trace_id_from("garbage") is None
    assert logs.trace_id_from(f"00-{'0' * 32}-00f067aa0ba902b7-01") is None
    token = logs.trace_id.set(trace)
    try:
        line = json.loads(logs.JSONFormatter("p1").format(record(run_id=RUN_ID)))
    finally:
        logs.trace_id.reset(token)
    assert line["trace_id"] == trace


def test_observer_counts_peers_marked_down_within_the_window_and_throughput() -> None:
    obs = Observer(Metrics())
    down = commands.PeerDown("c1", 1_000, "p2", "inc")
    submit = commands.Submit("c2", 5_000, [])
    finish = commands.Finish("c3", 12_000, "r1", 1, "succeeded", None)
    obs.applied(
        [cmd.to_wire() for cmd in (down, submit, finish)],
        [
            res.Requeued(2),
            res.Submitted([res.RunOutcome("a", created=True), res.RunOutcome("b")]),
            res.Done(),
        ],
    )
    obs.applied(
        [commands.PeerDown("c4", 2_000, "p3", "inc").to_wire()],
        [res.Rejected(res.Rejection.CONFLICT, "peer has restarted since it was judged")],
    )
    assert obs.recent_downs(2_000) == [(1_000, "p2")]
    assert obs.recent_downs(1_000 + CHURN_WINDOW_MS + 1) == []
    series = obs.throughput_series(12_000)
    assert series[-1] == {"t": 10.0, "submitted": 0, "finished": 1}
    assert series[-2] == {"t": 0.0, "submitted": 1, "finished": 0}
    assert series[-1]["t"] - series[-2]["t"] == THROUGHPUT_BUCKET_MS / 1000


def test_observer_counts_a_leader_change_not_the_first_leader() -> None:
    metrics = Metrics()
    obs = Observer(metrics)
    for leader in ("a:1", None, "a:1", "b:1", "b:1"):
        obs._leader_seen(leader)
    assert metrics.leader_changes._value.get() == 1


def test_failover_lasts_from_the_loss_to_the_reassignment() -> None:
    state = MeshState()
    state.runs["r1"] = Run(id="r1", spec=RunSpec("a"), status=RunStatus.RUNNING, owner="p2")
    state.runs["r2"] = Run(id="r2", spec=RunSpec("a"), status=RunStatus.RUNNING, owner="p3")
    failovers = Failovers()
    assert failovers.owner_lost(state, "p2", lost_at_ms=10_000) == 1
    state.runs["r1"].status = RunStatus.QUEUED
    assert failovers.resumed(state) == []
    state.runs["r1"].status = RunStatus.RUNNING
    state.runs["r1"].owner = "p1"
    state.runs["r1"].assigned_at_ms = 12_500
    assert failovers.resumed(state) == [2.5]
    assert failovers.lost == {}


def cluster_answer() -> dict[str, object]:
    return {
        "leader": "p1",
        "term": 7,
        "runs": {"queued": 3, "running": 2, "waiting": 0, "paused": 0},
        "queue": {"depth": 3, "oldest_age_s": 4.25, "waiting_for": {"no free slot": 3}},
        "peers": [
            {"id": "p1", "role": "voter", "status": "up", "slots": 2, "running": 2},
            {"id": "p2", "role": "voter", "status": "down", "slots": 2, "running": 0},
        ],
        "throughput": {
            "bucket_s": 10,
            "series": [
                {"t": 0, "submitted": 1, "finished": 0},
                {"t": 10, "submitted": 0, "finished": 4},
            ],
        },
    }


def test_mesh_top_frame_shows_the_overview() -> None:
    console = Console(width=100, record=True, color_system=None)
    console.print(render(cluster_answer(), "http://p1", 0.0))
    text = console.export_text()
    for expected in (
        "leader p1",
        "term 7",
        "queue 3",
        "oldest queued 4.2 s",
        "waiting 0",
        "paused 0",
        "p1 (leader)",
        "down",
        "2 / 2",
        "4 in the last minute",
        "3 queued: no free slot",
    ):
        assert expected in text, expected


def test_sparkline_scales_to_the_highest_bucket() -> None:
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([0, 4, 8]) == "▁▅█"
