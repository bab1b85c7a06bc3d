"""The leader's liveness view: a dead peer is judged one TTL after a leader change, not two.

Found by the chaos harness: after kill -9 of the leader, a peer that died with
it was marked down only after the grace period *plus* a full TTL.
"""

from __future__ import annotations

from mesh.liveness import Liveness

UP = {"a": "i1", "b": "i1"}


def test_a_peer_silent_since_the_leader_change_is_suspected_one_ttl_later() -> None:
    live = Liveness(ttl_s=2.0)
    live.reset(now=100.0)
    for t in (100.0, 100.2, 101.0, 101.9):  # the leader ticks during its grace
        assert live.suspects(UP, t) == []
        live.heard("a", "i1", t)
    assert live.suspects(UP, 102.1) == [("b", "i1")]


def test_a_peer_that_appears_later_gets_its_own_ttl() -> None:
    live = Liveness(ttl_s=2.0)
    live.reset(now=100.0)
    live.heard("a", "i1", 103.0)
    assert live.suspects({"a": "i1"}, 103.0) == []
    # c joins the state at 103.5, long after the grace: judged from then.
    assert live.suspects({"a": "i1", "c": "i9"}, 103.5) == []
    live.heard("a", "i1", 105.0)
    assert live.suspects({"a": "i1", "c": "i9"}, 105.4) == []
    assert live.suspects({"a": "i1", "c": "i9"}, 105.6) == [("c", "i9")]


def test_a_new_incarnation_restarts_the_clock() -> None:
    live = Liveness(ttl_s=2.0)
    live.reset(now=0.0)
    live.heard("a", "i1", 5.0)
    assert live.suspects({"a": "i2"}, 6.0) == []
    assert live.suspects({"a": "i2"}, 8.1) == [("a", "i2")]
