"""The diagnostics checks as pure functions of the values a peer gathers."""

from __future__ import annotations

import dataclasses
from typing import Any

from raftmesh.mesh import diagnostics
from raftmesh.mesh.diagnostics import FAIL, PASS, WARN, PeerVitals, Vitals

GB = 1024**3


def healthy(**changes: Any) -> Vitals:
    base = Vitals(
        now_ms=1_000_000,
        self_id="p1",
        leader="p1",
        term=3,
        has_quorum=True,
        peer_ttl_s=2.0,
        peers=[PeerVitals("p1", "up", 0, 0.1), PeerVitals("p2", "up", 0, 0.3)],
        storage_latency_ms=1.5,
        storage_error=None,
        downs_recent=[],
        oldest_queued_s=0.0,
        queue_sla_s=60.0,
        clock_skews_ms={"p2": 3.0},
        disk_free_bytes=50 * GB,
        disk_total_bytes=100 * GB,
        raft_log_entries=100,
        raft_files_bytes=1024,
    )
    return dataclasses.replace(base, **changes)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def test_a_healthy_mesh_passes_every_check() -> None:
    report = diagnostics.diagnose(healthy())
    assert report["status"] == PASS
    assert set(by_name(report)) == {
        "quorum",
        "liveness:p1",
        "liveness:p2",
        "storage",
        "lease_churn",
        "queue_age",
        "clock_skew",
        "disk",
        "raft_size",
    }
    assert all(c["status"] == PASS for c in report["checks"])


def test_the_worst_check_is_the_verdict() -> None:
    report = diagnostics.diagnose(healthy(storage_latency_ms=250.0))
    assert report["status"] == WARN
    report = diagnostics.diagnose(healthy(leader=None))
    assert report["status"] == FAIL
    assert "no Raft leader" in by_name(report)["quorum"]["detail"]


def test_liveness_fails_for_a_down_peer_and_warns_for_a_late_one() -> None:
    peers = [
        PeerVitals("p1", "up", 0, 0.1),
        PeerVitals("p2", "down", 990_000, None),
        PeerVitals("p3", "up", 0, 1.5),
        PeerVitals("p4", "left", 0, None),
    ]
    checks = by_name(diagnostics.diagnose(healthy(peers=peers)))
    assert checks["liveness:p2"]["status"] == FAIL
    assert "down (for 10 s)" in checks["liveness:p2"]["detail"]
    assert checks["liveness:p3"]["status"] == WARN
    assert "liveness:p4" not in checks


def test_followers_do_not_judge_report_ages() -> None:
    peers = [PeerVitals("p1", "up", 0, None), PeerVitals("p2", "up", 0, None)]
    checks = by_name(diagnostics.diagnose(healthy(peers=peers, clock_skews_ms=None)))
    assert checks["liveness:p2"]["status"] == PASS
    assert "clock_skew" not in checks


def test_a_follower_judges_its_own_clock_against_the_leader() -> None:
    check = diagnostics.clock_skew(healthy(self_id="p2", clock_skews_ms={"p2": 400.0}))
    assert check is not None
    assert check["status"] == WARN
    assert check["detail"] == "largest skew 400.0 ms (p2 against the leader, p1)"


def test_storage_unreachable_fails_and_unprobed_warns() -> None:
    failed = diagnostics.storage(healthy(storage_error="connection refused"))
    assert failed["status"] == FAIL and "connection refused" in failed["detail"]
    assert diagnostics.storage(healthy(storage_latency_ms=None))["status"] == WARN


def test_lease_churn_counts_peers_marked_down_lately() -> None:
    assert diagnostics.lease_churn(healthy(downs_recent=[(1, "p2")]))["status"] == WARN
    many = [(1, "p2"), (2, "p3"), (3, "p2")]
    check = diagnostics.lease_churn(healthy(downs_recent=many))
    assert check["status"] == FAIL and check["count"] == 3 and "p2, p3" in check["detail"]


def test_queue_age_against_the_sla() -> None:
    assert diagnostics.queue_age(healthy(oldest_queued_s=29))["status"] == PASS
    assert diagnostics.queue_age(healthy(oldest_queued_s=31))["status"] == WARN
    assert diagnostics.queue_age(healthy(oldest_queued_s=61))["status"] == FAIL


def test_clock_skew_takes_the_worst_peer_either_way() -> None:
    check = diagnostics.clock_skew(healthy(clock_skews_ms={"p2": 10.0, "p3": -1500.0}))
    assert check is not None
    assert check["status"] == FAIL and check["peer"] == "p3"
    check = diagnostics.clock_skew(healthy(clock_skews_ms={}))
    assert check is not None and check["status"] == WARN


def test_disk_and_raft_size_thresholds() -> None:
    assert diagnostics.disk(healthy(disk_free_bytes=10 * GB))["status"] == WARN
    assert diagnostics.disk(healthy(disk_free_bytes=GB))["status"] == FAIL
    assert diagnostics.raft_size(healthy(raft_log_entries=60_000))["status"] == WARN
    assert diagnostics.raft_size(healthy(raft_files_bytes=3 * GB))["status"] == FAIL
