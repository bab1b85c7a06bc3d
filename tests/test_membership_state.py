"""The membership commands of the pure state machine: join reservations,
drain, stopping, leave and its majority guard rail."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.eligibility import accepts_work
from raftmesh.consensus.state import MeshState

_cids = (f"c{i}" for i in itertools.count())


def apply(state: MeshState, make, *args) -> dict:
    return state.apply(make(next(_cids), 1_000, *args))


def mesh_of(*voters: str, executors: tuple[str, ...] = ()) -> MeshState:
    state = MeshState()
    for pid in voters:
        assert apply(state, c.PeerUp, pid, f"{pid}-i1", f"{pid}:7000", f"{pid}:8000", 2, {}).ok
    for pid in executors:
        up = apply(state, c.PeerUp, pid, f"{pid}-i1", "", f"{pid}:8000", 2, {}, None, "executor")
        assert up.ok
    return state


def submit(state: MeshState, run_id: str) -> None:
    assert apply(state, c.Submit, [{"id": run_id, "agent": "echo", "input": 1}]).ok


def test_join_reserves_an_id_once_and_refuses_addresses_in_use():
    state = mesh_of("a", "b", "c")
    first = apply(state, c.PeerJoin, "d", "d:7000", "d:8000", "voter")
    assert first == res.Joined(created=True)
    # The same join again (a retry) is harmless; another with the id is not.
    assert apply(state, c.PeerJoin, "d", "d:7000", "d:8000", "voter") == res.Joined(created=False)
    other = apply(state, c.PeerJoin, "d", "x:7000", "x:8000", "voter")
    assert not other.ok and "'d' is already in use" in other.message
    taken = apply(state, c.PeerJoin, "e", "a:7000", "e:8000", "voter")
    assert not taken.ok and "already used by peer 'a'" in taken.message
    assert state.peers["d"].status == "joining" and not accepts_work(state.peers["d"])
    assert apply(state, c.PeerUp, "d", "d-i1", "d:7000", "d:8000", 2, {}).ok
    assert state.peers["d"].status == "up"


def test_drained_and_stopping_peers_get_nothing_new():
    state = mesh_of("a", "b")
    submit(state, "r1")
    assert apply(state, c.PeerDrain, "a", "finish").ok
    refused = apply(state, c.Assign, 1, [("r1", "a", 1)])
    assert refused.rejected == {"r1": "peer is draining or stopping"}
    assert apply(state, c.PeerStopping, "b", "b-i1").ok
    assert apply(state, c.Assign, 1, [("r1", "b", 1)]).rejected
    # A drain is the operator's and outlives a restart; stopping is the process's.
    assert apply(state, c.PeerUp, "a", "a-i2", "a:7000", "a:8000", 2, {}).ok
    assert apply(state, c.PeerUp, "b", "b-i2", "b:7000", "b:8000", 2, {}).ok
    assert state.peers["a"].drain == "finish" and not state.peers["b"].stopping
    assert apply(state, c.Assign, 1, [("r1", "b", 1)]).accepted == ["r1"]
    assert apply(state, c.PeerDrain, "a", "").ok and accepts_work(state.peers["a"])
    assert not apply(state, c.PeerDrain, "a", "sideways").ok
    assert not apply(state, c.PeerStopping, "a", "a-i1").ok, "a stale incarnation"


def test_leave_requeues_and_keeps_a_majority_of_voters():
    state = mesh_of("a", "b", "c", executors=("x",))
    submit(state, "r1")
    assert apply(state, c.Assign, 1, [("r1", "c", 1)]).accepted == ["r1"]
    assert apply(state, c.PeerDown, "b", "b-i1").ok
    refused = apply(state, c.PeerLeave, "a")
    assert not refused.ok and "could not form a majority" in refused.message
    assert state.peers["a"].status == "up"
    # The down voter may go: the two that remain are both up.
    assert apply(state, c.PeerLeave, "b").ok
    assert apply(state, c.PeerLeave, "x").ok, "executors never count towards a majority"
    left = apply(state, c.PeerLeave, "c")
    assert left == res.Requeued(1)
    assert state.runs["r1"].status == "queued" and state.runs["r1"].epoch == 1
    last = apply(state, c.PeerLeave, "a")
    assert not last.ok and "last voter" in last.message
    # A peer that left cannot come back by announcing itself, only by joining.
    assert not apply(state, c.PeerUp, "c", "c-i2", "c:7000", "c:8000", 2, {}).ok
    # One voter cannot take a second by a join: 1 of 2 up is no majority.
    alone = apply(state, c.PeerJoin, "c", "c:7000", "c:8000", "voter")
    assert not alone.ok and "could not form a majority" in alone.message
    assert apply(state, c.PeerUp, "e", "e-i1", "e:7000", "e:8000", 2, {}).ok
    assert apply(state, c.PeerJoin, "c", "c:7000", "c:8000", "voter").created
    assert apply(state, c.PeerUp, "c", "c-i2", "c:7000", "c:8000", 2, {}).ok


def test_membership_survives_a_snapshot():
    state = mesh_of("a", "b", executors=("x",))
    apply(state, c.PeerDrain, "a", "release")
    apply(state, c.PeerJoin, "d", "d:7000", "d:8000", "voter")
    restored = MeshState.from_dict(state.to_dict())
    assert {p: v.public() for p, v in restored.peers.items()} == {
        p: v.public() for p, v in state.peers.items()
    }


PEERS = ["a", "b", "c", "x", "y"]
EXECUTORS = {"x", "y"}


@st.composite
def membership_ops(draw: st.DrawFn) -> list[tuple[str, tuple]]:
    """A random history of submits, assignments and membership changes."""
    ops = []
    for _ in range(draw(st.integers(1, 40))):
        pid = draw(st.sampled_from(PEERS))
        kind = draw(
            st.sampled_from(
                ["submit", "assign", "up", "down", "drain", "stopping", "leave", "join"]
            )
        )
        inc = f"{pid}-i{draw(st.integers(1, 3))}"
        if kind == "submit":
            ops.append(("submit", (f"r{draw(st.integers(0, 2))}",)))
        elif kind == "assign":
            ops.append(("assign", (f"r{draw(st.integers(0, 2))}", pid)))
        elif kind == "drain":
            ops.append(("drain", (pid, draw(st.sampled_from(["", "finish", "release"])))))
        else:
            ops.append((kind, (pid, inc)))
    return ops


@settings(max_examples=300, deadline=None)
@given(membership_ops())
def test_membership_histories_keep_owners_schedulable_and_a_voter_majority(ops):
    state = mesh_of("a", "b", "c", executors=("x", "y"))
    for kind, args in ops:
        pre_voters = _voters(state)
        if kind == "submit":
            submit(state, args[0])
            continue
        if kind == "assign":
            run = state.runs.get(args[0])
            epoch = run.epoch + 1 if run else 1
            peer = state.peers.get(args[1])
            result = apply(state, c.Assign, 1, [(args[0], args[1], epoch)])
            if args[0] in result.accepted:
                assert peer is not None and accepts_work(peer), (
                    "work went to a peer that takes none"
                )
            continue
        pid, extra = args
        role = "executor" if pid in EXECUTORS else "voter"
        raft = "" if role == "executor" else f"{pid}:7000"
        if kind == "up":
            result = apply(state, c.PeerUp, pid, extra, raft, f"{pid}:8000", 2, {}, None, role)
        elif kind == "down":
            result = apply(state, c.PeerDown, pid, extra)
        elif kind == "drain":
            result = apply(state, c.PeerDrain, pid, extra)
        elif kind == "stopping":
            result = apply(state, c.PeerStopping, pid, extra)
        elif kind == "join":
            result = apply(state, c.PeerJoin, pid, raft, f"{pid}:8000", role)
            if isinstance(result, res.Joined) and result.created and role == "voter":
                after = _voters(state)
                up = {v for v in after if state.peers[v].status == "up"}
                assert len(up) > len(after) / 2, "a join left the up voters a minority"
        else:
            result = apply(state, c.PeerLeave, pid)
            if result.ok and role == "voter":
                remaining = pre_voters - {pid}
                up = {v for v in remaining if state.peers[v].status == "up"}
                assert remaining and len(up) > len(remaining) / 2
        assert isinstance(result.ok, bool)
        # Nobody that left, is down, or has not joined yet owns a run.
        for run in state.runs.values():
            if run.owner is not None:
                assert state.peers[run.owner].status == "up", (kind, args, run)
        # A peer that left stays out until it joins again.
        for peer in state.peers.values():
            if peer.status == "left":
                assert state.running_on(peer.id) == 0
    assert MeshState.from_dict(state.to_dict()).to_dict() == state.to_dict()


def _voters(state: MeshState) -> set[str]:
    return {p.id for p in state.peers.values() if p.role == "voter" and p.status != "left"}


def test_a_voter_join_that_would_leave_the_up_voters_short_of_a_majority_is_refused():
    """Issue 10, finding 4: reservations of voters that never connect count as
    voters that are down, so made-up joins cannot pile up past the majority."""
    state = mesh_of("a", "b", "c")
    assert apply(state, c.PeerJoin, "x1", "x1:7000", "x1:8000", "voter").ok
    assert apply(state, c.PeerJoin, "x2", "x2:7000", "x2:8000", "voter").ok
    third = apply(state, c.PeerJoin, "x3", "x3:7000", "x3:8000", "voter")
    assert not third.ok and "could not form a majority" in third.message
    assert "x3" not in state.peers
    # An executor does not vote: it may always join.
    assert apply(state, c.PeerJoin, "e1", "", "e1:8000", "executor").ok
    # A reservation that expires (removed by the leader) makes room again.
    assert apply(state, c.PeerLeave, "x1").ok
    assert apply(state, c.PeerJoin, "x3", "x3:7000", "x3:8000", "voter").ok
    # A voter that is down counts as down: 2 of 3 up, a 4th would make 2 of 4.
    small = mesh_of("a", "b", "c")
    assert apply(small, c.PeerDown, "c", "c-i1").ok
    refused = apply(small, c.PeerJoin, "d", "d:7000", "d:8000", "voter")
    assert not refused.ok and "only 2 are up" in refused.message


def test_forced_leave_drops_a_voter_without_the_majority_guard():
    state = mesh_of("a", "b", "c", "d", "e")
    for pid in ("c", "d", "e"):
        assert apply(state, c.PeerDown, pid, f"{pid}-i1").ok
    guarded = apply(state, c.PeerLeave, "c")
    assert not guarded.ok and "could not form a majority" in guarded.message
    for pid in ("c", "d", "e"):
        assert apply(state, c.PeerLeave, pid, True).ok
    assert {p.id for p in state.peers.values() if p.status == "up"} == {"a", "b"}
    assert apply(state, c.PeerJoin, "f", "f:7000", "f:8000", "voter").ok
