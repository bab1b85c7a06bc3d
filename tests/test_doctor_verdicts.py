"""``mesh doctor``'s verdicts, decided from observations without any I/O."""

from __future__ import annotations

from typing import Any

from raftmesh.cli.doctor import (
    FAIL,
    PASS,
    WARN,
    Observation,
    PeerProbe,
    churn_counters,
    evaluate,
)


def peer(i: int, **kw: Any) -> PeerProbe:
    defaults: dict[str, Any] = {
        "id": f"peer-{i}",
        "role": "voter",
        "status": "up",
        "http": f"10.0.0.{i}:8001",
        "raft": f"10.0.0.{i}:7001",
        "drain": None,
        "healthy": True,
        "ready": True,
        "reason": "ok",
        "churn": dict.fromkeys(
            [
                "raftmesh_peers_marked_down",
                "raftmesh_self_fenced_attempts",
                "raftmesh_attempts:fenced",
            ],
            0.0,
        ),
    }
    return PeerProbe(**{**defaults, **kw})


def observation(peers: list[PeerProbe], **cluster: Any) -> Observation:
    base = {
        "self": "peer-1",
        "leader": "peer-1",
        "term": 3,
        "voters": [p.raft for p in peers if p.raft],
        "queue": {"depth": 0, "oldest_age_s": 0.0},
    }
    return Observation("http://10.0.0.1:8001", cluster={**base, **cluster}, peers=peers)


def verdicts(obs: Observation, sla_s: float = 60) -> dict[str, str]:
    return {c.name: c.status for c in evaluate(obs, sla_s)}


def test_healthy_mesh_passes_everything():
    assert set(verdicts(observation([peer(1), peer(2), peer(3)])).values()) == {PASS}


def test_unreachable_entry_peer_is_the_only_check_and_fails():
    checks = evaluate(Observation("http://x:1", error="cannot reach it"), 60)
    assert [(c.name, c.status) for c in checks] == [("API", FAIL)]


def test_no_leader_fails():
    assert verdicts(observation([peer(1), peer(2), peer(3)], leader=None))["leader"] == FAIL


def test_dead_peer_fails_and_quorum_warns_then_fails():
    dead = peer(3, healthy=False, ready=None, error="connection refused", churn=None)
    got = verdicts(observation([peer(1), peer(2), dead]))
    assert got["peer peer-3 (voter)"] == FAIL and got["quorum"] == WARN
    two_dead = [peer(1), peer(2, status="down", healthy=False), dead]
    assert verdicts(observation(two_dead))["quorum"] == FAIL


def test_peer_marked_down_that_still_answers_fails():
    assert verdicts(observation([peer(1), peer(2, status="down")]))["peer peer-2 (voter)"] == FAIL


def test_joining_peer_warns():
    got = verdicts(observation([peer(1), peer(2), peer(3), peer(4, status="joining")]))
    assert got["peer peer-4 (voter)"] == WARN


def test_not_ready_or_draining_peer_warns():
    got = verdicts(
        observation(
            [peer(1), peer(2, ready=False, reason="no known Raft leader"), peer(3, drain="release")]
        )
    )
    assert got["peer peer-2 (voter)"] == WARN and got["peer peer-3 (voter)"] == WARN


def test_storage_reasons_from_readyz_fail_the_storage_check():
    broken = peer(2, ready=False, reason="storage unreachable: connection refused")
    checks = {c.name: c for c in evaluate(observation([peer(1), broken, peer(3)]), 60)}
    assert (
        checks["storage"].status == FAIL
        and "peer-2: storage unreachable" in checks["storage"].detail
    )


def test_queue_age_against_the_sla():
    def queue(age: float) -> str:
        return verdicts(observation([peer(1)], queue={"depth": 4, "oldest_age_s": age}), 60)[
            "queue"
        ]

    assert (queue(10), queue(45), queue(90)) == (PASS, WARN, FAIL)


def test_lease_churn_warns_only_when_counters_grow_within_the_window():
    moved = peer(2)
    assert moved.churn is not None
    moved.churn["raftmesh_attempts:fenced"] = 2
    obs = observation([peer(1), moved])
    assert verdicts(obs)["lease churn"] == PASS, "totals since start are history"
    obs.churn_before = dict.fromkeys(moved.churn, 0.0)
    obs.window_s = 5
    checks = {c.name: c for c in evaluate(obs, 60)}
    assert (
        checks["lease churn"].status == WARN and "2 fenced attempts" in checks["lease churn"].detail
    )


def test_churn_counters_read_the_exposition_format():
    text = "\n".join(
        [
            "# TYPE raftmesh_peers_marked_down_total counter",
            "raftmesh_peers_marked_down_total 3.0",
            "# TYPE raftmesh_attempts_total counter",
            'raftmesh_attempts_total{outcome="fenced"} 2.0',
            'raftmesh_attempts_total{outcome="succeeded"} 40.0',
            "# TYPE raftmesh_self_fenced_attempts_total counter",
            "raftmesh_self_fenced_attempts_total 1.0",
        ]
    )
    assert churn_counters(text + "\n") == {
        "raftmesh_peers_marked_down": 3.0,
        "raftmesh_self_fenced_attempts": 1.0,
        "raftmesh_attempts:fenced": 2.0,
    }
