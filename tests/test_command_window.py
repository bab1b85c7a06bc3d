"""How long apply remembers command ids: every one of the window is in the
state and its snapshot, so a window of 10 minutes made the snapshot grow with
every finished run of the last 10 minutes (issue 12: "Raft state and snapshot
flat as finished runs pile up"). The leader replicates a one-minute window,
gated like the handoff, since a replica that forgets a cid sooner than the
others would apply a late copy of it that they refuse."""

from __future__ import annotations

from typing import Any

import msgpack

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.commands import COMMAND_TTL_MS
from raftmesh.consensus.state import MIN_COMMAND_TTL_MS, SHORT_COMMAND_TTL_MS, MeshState
from raftmesh.mesh.leader import Leader
from raftmesh.mesh.liveness import Liveness
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.mesh.settings import Settings

T0 = 1_000_000_000


def apply(state: MeshState, cmd: c.Command | dict[str, Any]) -> Any:
    wire = cmd.to_wire() if isinstance(cmd, c.Command) else cmd
    return state.apply(msgpack.unpackb(msgpack.packb(wire)))


def one_run_a_second(state: MeshState, seconds: int) -> None:
    """A run submitted and cancelled each second: two command ids a second."""
    for i in range(seconds):
        at = T0 + 1000 * i
        assert apply(state, c.Submit(f"s{i}", at, [{"id": f"r{i}", "agent": "echo"}])).ok
        assert apply(state, c.Cancel(f"x{i}", at, f"r{i}")).ok


def test_a_short_window_keeps_the_state_flat_as_runs_finish() -> None:
    default = MeshState()
    one_run_a_second(default, 300)
    assert len(default.seen) == 600, "ten minutes: every command of the five"
    short = MeshState()
    assert apply(short, c.Configure("cfg", T0, {}, None, command_ttl_ms=60_000)) == res.Done()
    one_run_a_second(short, 300)
    assert len(short.seen) <= 2 * 61, "one minute of commands"


def test_a_command_within_the_window_is_answered_again_not_applied_again() -> None:
    state = MeshState()
    apply(state, c.Configure("cfg", T0, {}, None, command_ttl_ms=MIN_COMMAND_TTL_MS))
    submit = c.Submit("s1", T0, [{"id": "r1", "agent": "echo"}])
    first = apply(state, submit)
    apply(state, c.Cancel("x1", T0 + 1, "r1"))
    before = state.to_dict() | {"applied": None}
    assert apply(state, submit) == first, "the same cid, the same answer"
    assert state.to_dict() | {"applied": None} == before, "and nothing applied again"


def test_the_window_is_bounded_survives_a_snapshot_and_an_older_one_keeps_ten_minutes() -> None:
    state = MeshState()
    for bad in (MIN_COMMAND_TTL_MS - 1, COMMAND_TTL_MS + 1, "60000", True):
        wire = c.Configure(f"c{bad}", T0, {}, None).to_wire() | {"command_ttl_ms": bad}
        assert not apply(state, wire).ok, bad
        assert state.command_ttl_ms == COMMAND_TTL_MS
    old_proposer = c.Configure("old", T0, {}, None).to_wire()
    del old_proposer["command_ttl_ms"]
    assert apply(state, old_proposer) == res.Done()
    assert state.command_ttl_ms == COMMAND_TTL_MS, "a configure from before keeps ten minutes"
    apply(state, c.Configure("new", T0, {}, None, command_ttl_ms=SHORT_COMMAND_TTL_MS))
    restored = MeshState.from_dict(msgpack.unpackb(msgpack.packb(state.to_dict())))
    assert restored.command_ttl_ms == SHORT_COMMAND_TTL_MS
    older = state.to_dict()
    del older["command_ttl_ms"]
    assert MeshState.from_dict(older).command_ttl_ms == COMMAND_TTL_MS


def test_the_leader_shortens_the_window_only_once_every_member_applies_it() -> None:
    state = MeshState()
    apply(state, c.PeerUp("u1", T0, "p1", "i1", "r1", "h1", 1, {}))
    apply(state, c.PeerUp("u2", T0, "p2", "i1", "r2", "h2", 1, {}))
    liveness = Liveness(2.0)
    leader = Leader("p1", "i1", Scheduler(), liveness, Settings(id="p1").replicated_policy())

    def tick() -> int:
        for cmd in leader.tick(state, 1, T0, 0.0):
            if isinstance(cmd, c.Configure):
                assert apply(state, cmd) == res.Done()
        return state.command_ttl_ms

    assert tick() == COMMAND_TTL_MS, "p2 has not said what it applies"
    liveness.heard("p2", "i1", 0.0, frozenset({"handoff", "prefetch"}))
    assert tick() == COMMAND_TTL_MS, "the release before this one keeps ten minutes"
    liveness.heard("p2", "i1", 0.0, frozenset({"handoff", "prefetch", "command_ttl_ms"}))
    assert tick() == SHORT_COMMAND_TTL_MS
