"""The leader's liveness view: a dead peer is judged one TTL after a leader change, not two.

Found by the chaos harness: after kill -9 of the leader, a peer that died with
it was marked down only after the grace period *plus* a full TTL.
"""

from __future__ import annotations

from raftmesh.consensus.model import PEER_LEFT, Peer
from raftmesh.mesh.liveness import LeaderContact, Liveness

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


def peers(up: list[str], left: int = 0) -> list[Peer]:
    return [Peer(id=p, incarnation="i1", raft="", http="", slots=1) for p in up] + [
        Peer(id=f"gone-{i}", incarnation="i1", raft="", http="", slots=1, status=PEER_LEFT)
        for i in range(left)
    ]


def test_a_leader_of_a_shrunk_mesh_is_in_contact_when_the_up_peers_report() -> None:
    """Peers that left stay in the state; counting them made the leader of a
    mesh that had lost many members judge itself cut off forever, so it
    stopped (self-fenced) its own runs and never started new ones (found by
    the chaos soak with join/leave faults: acknowledged runs never finished)."""
    contact = LeaderContact(ttl_s=2.0)
    live = Liveness(ttl_s=2.0)
    for peer in ("a", "b", "c"):
        live.heard(peer, "i1", 10.0)
    assert contact.heard_majority(live, peers(["a", "b", "c"], left=9), 10.5)


def test_a_partitioned_leader_hearing_only_itself_is_not_in_contact() -> None:
    contact = LeaderContact(ttl_s=2.0)
    live = Liveness(ttl_s=2.0)
    for peer in ("a", "b", "c"):
        live.heard(peer, "i1", 10.0)
    live.heard("a", "i1", 12.0)  # the leader itself keeps ticking
    assert not contact.heard_majority(live, peers(["a", "b", "c"], left=9), 12.0)
    contact.confirmed(10.0)
    assert contact.cut_off(12.0)


def test_a_new_leader_judges_the_leader_before_it_from_when_it_last_heard_it() -> None:
    """A dead leader's runs waited for the election and then a full TTL. The
    peer that takes over heard from it itself (its heartbeats' acks): the old
    leader is judged from then; everyone else still gets the grace."""
    live = Liveness(ttl_s=2.0)
    live.reset(now=100.0, previous=("a", "i1", 99.0))
    for t in (100.0, 100.9):  # the leader ticks from when it leads
        assert live.suspects(UP, t) == []
    assert live.suspects(UP, 101.1) == [("a", "i1")], "one TTL after the last ack, in the grace"
    assert live.suspects(UP, 102.1) == [("a", "i1"), ("b", "i1")]


def test_the_leader_before_is_not_suspected_while_it_reports_or_once_it_restarted() -> None:
    live = Liveness(ttl_s=2.0)
    live.reset(now=100.0, previous=("a", "i1", 99.0))
    live.heard("a", "i1", 100.5)  # handed leadership over and reports to the new leader
    assert live.suspects(UP, 101.1) == []
    live.reset(now=200.0, previous=("a", "i1", 199.0))
    restarted = {"a": "i2", "b": "i1"}  # came back under a new incarnation
    assert live.suspects(restarted, 201.1) == [], "a new incarnation gets the grace"
