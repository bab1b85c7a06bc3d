"""The leader's duties as a pure decision: states built through ``apply``, no sockets."""

from __future__ import annotations

from raftmesh.consensus import commands as c
from raftmesh.consensus.state import MeshState
from raftmesh.mesh.leader import Leader
from raftmesh.mesh.liveness import LeaderContact, Liveness
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.mesh.settings import Settings

T0 = 1_000_000
POLICY = Settings().replicated_policy()


def state_with(peers: dict[str, int], runs: int) -> MeshState:
    state = MeshState()
    n = 0
    for peer_id, slots in peers.items():
        n += 1
        assert state.apply(c.PeerUp(f"c{n}", T0, peer_id, "i1", "r" + peer_id, "h", slots, {})).ok
    specs = [{"id": f"r{i}", "agent": "echo", "input": i} for i in range(runs)]
    assert state.apply(c.Submit("s", T0, specs)).ok
    assert state.apply(c.Configure("cfg", T0, **POLICY)).ok
    return state


def leader(ttl_s: float = 2.0) -> Leader:
    return Leader("a", "i1", Scheduler("least-loaded", 60.0), Liveness(ttl_s), POLICY)


def ops(cmds: list[c.Command]) -> list[str]:
    return [cmd.op for cmd in cmds]


def test_a_follower_proposes_nothing() -> None:
    assert leader().tick(state_with({"a": 2}, 3), None, T0, 0.0) == []


def test_the_leader_assigns_queued_runs_within_free_slots() -> None:
    state = state_with({"a": 2, "b": 1}, 5)
    cmds = leader().tick(state, 7, T0, 0.0)
    assert ops(cmds) == ["assign"]
    assert cmds[0].term == 7
    batch = cmds[0].batch
    assert len(batch) == 3
    result = state.apply(cmds[0])
    assert len(result.accepted) == 3
    assert leader().tick(state, 7, T0, 0.0) == [], "no free slot is left to fill"


def test_a_silent_peer_is_proposed_down_one_ttl_after_the_leader_took_over() -> None:
    state = state_with({"a": 1, "b": 1}, 0)
    duty = leader(ttl_s=2.0)
    assert duty.tick(state, 1, T0, 100.0) == []
    assert duty.tick(state, 1, T0, 101.9) == [], "within the TTL no peer is judged"
    duty.liveness.heard("b", "i1", 101.0)
    assert duty.tick(state, 1, T0, 102.5) == [], "b reported 1.5 s ago"
    cmds = duty.tick(state, 1, T0, 103.5)
    assert ops(cmds) == ["peer_down"]
    assert (cmds[0].peer, cmds[0].incarnation) == ("b", "i1")


def test_the_leader_before_is_proposed_down_one_ttl_after_it_last_acknowledged_this_peer() -> None:
    """b led and acknowledged a's last heartbeat at 99.5, then died; a, elected
    at 100, judges b from 99.5, not from its own election."""
    state = state_with({"a": 1, "b": 1, "c": 1}, 0)
    contact = LeaderContact(ttl_s=2.0)
    contact.confirmed(99.5, "b")
    duty = Leader("a", "i1", Scheduler("least-loaded", 60.0), Liveness(2.0), POLICY, contact)
    assert duty.tick(state, 2, T0, 100.0) == []
    assert duty.tick(state, 2, T0, 101.4) == []
    cmds = duty.tick(state, 2, T0, 101.6)
    assert ops(cmds) == ["peer_down"], "c, never heard by a, still has its grace"
    assert (cmds[0].peer, cmds[0].incarnation) == ("b", "i1")


def test_a_policy_that_differs_from_the_replicated_one_is_configured_first() -> None:
    state = state_with({"a": 1}, 1)
    policy = {**POLICY, "default_tenant_cap": 3}
    duty = Leader("a", "i1", Scheduler("least-loaded", 60.0), Liveness(2.0), policy)
    cmds = duty.tick(state, 1, T0, 0.0)
    assert ops(cmds) == ["configure", "assign"]
    for cmd in cmds:
        assert state.apply(cmd).ok
    assert state.default_tenant_cap == 3
    assert ops(duty.tick(state, 1, T0, 0.0)) == []


def test_decided_endings_are_listed_for_storage_before_they_settle() -> None:
    state = state_with({"a": 1}, 2)
    assert state.apply(c.Cancel("x", T0, "r0")).ok
    decided = Leader.decided(state)
    assert [(d.row.id, d.outcome, d.message) for d in decided] == [
        ("r0", "cancelled", "cancelled by request")
    ]
    assert state.apply(c.Settle("y", T0, "r0")).ok
    assert Leader.decided(state) == []


def test_the_leader_wakes_waiting_runs_when_their_wait_ends_and_knows_the_next_timer() -> None:
    state = state_with({"a": 3}, 3)
    lead = leader()
    assert state.apply(lead.tick(state, 1, T0, 0.0)[0]).ok  # all three run on a
    waits = {
        "r0": {"kind": "timer", "due_ms": T0 + 1000},
        "r1": {"kind": "timer", "due_ms": T0 + 500},
        "r2": {"kind": "signal", "signal": "go", "index": 0},
    }
    for run_id, wait in waits.items():
        assert state.apply(c.Suspend(f"z{run_id}", T0, run_id, 1, wait)).ok
    assert lead.tick(state, 1, T0 + 10, 0.0) == []
    assert lead.next_due_ms == T0 + 500
    cmds = lead.tick(state, 1, T0 + 500, 0.0)
    assert ops(cmds) == ["wake"] and cmds[0].runs == ["r1"]
    assert lead.next_due_ms == T0 + 1000, "r1 is due now: woken, not waited for"
    assert state.apply(cmds[0]).woken == ["r1"]
    assert state.apply(c.Signal("sig", T0, "r2", "go", 0)).ok
    cmds = lead.tick(state, 1, T0 + 600, 0.0)
    assert [cmd.op for cmd in cmds] == ["wake", "assign"]
    assert cmds[0].runs == ["r2"]
    assert lead.tick(state, None, T0 + 2000, 0.0) == [], "a follower wakes nothing"
    assert lead.next_due_ms is None, "nor sets a timer"
