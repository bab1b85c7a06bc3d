"""A finish hands the slot it freed to the next queued run in the same apply.

Without it a slot turn is three commits apart: the finish, the leader's tick
on it, and the assign (issue 12). These build states through ``apply`` and
check which run the finish handed on, against the order the leader plans in.
"""

from __future__ import annotations

from typing import Any

import msgpack

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.spec import CONSISTENT_HASH
from raftmesh.consensus.state import HANDOFF_SCAN, MeshState
from raftmesh.consensus.status import RunStatus
from raftmesh.mesh.leader import Leader
from raftmesh.mesh.liveness import Liveness
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.mesh.settings import Settings

T0 = 1_000_000


class Mesh:
    def __init__(self, *, handoff: bool = True, aging_ms: int = 0) -> None:
        self.state = MeshState()
        self.n = 0
        self.apply(
            c.Configure(self.cid(), T0, {}, None, aging_ms=aging_ms, handoff=handoff),
        )

    def apply(self, cmd: c.Command) -> Any:
        # through the wire form, as every replica applies it
        result = self.state.apply(msgpack.unpackb(msgpack.packb(cmd.to_wire())))
        assert result.ok, result
        return result

    def cid(self) -> str:
        self.n += 1
        return f"c{self.n}"

    def peer(self, peer_id: str, slots: int = 1, **fields: Any) -> None:
        labels = fields.pop("labels", {})
        self.apply(c.PeerUp(self.cid(), T0, peer_id, "i1", "r", "h", slots, labels, **fields))

    def submit(self, at_ms: int = T0, **spec: Any) -> str:
        self.n += 1
        run = {"id": f"r{self.n:03d}", "agent": "echo", "input": None, **spec}
        outcome = self.apply(c.Submit(self.cid(), at_ms, [run])).runs[0]
        assert outcome.created, outcome
        return run["id"]

    def start(self, run_id: str, peer_id: str) -> None:
        epoch = self.state.runs[run_id].epoch + 1
        assert self.apply(c.Assign(self.cid(), T0, 1, [(run_id, peer_id, epoch)])).accepted

    def finish(self, run_id: str, at_ms: int = T0) -> Any:
        run = self.state.runs[run_id]
        return self.apply(c.Finish(self.cid(), at_ms, run_id, run.epoch, "succeeded", None))


def test_a_finish_starts_the_next_queued_run_on_the_same_peer_in_one_apply() -> None:
    mesh = Mesh()
    mesh.peer("p1")
    first, second, third = mesh.submit(), mesh.submit(), mesh.submit()
    mesh.start(first, "p1")
    assert mesh.finish(first, at_ms=T0 + 5) == res.Finished(second)
    run = mesh.state.runs[second]
    assert (run.status, run.owner, run.epoch, run.attempts) == (RunStatus.RUNNING, "p1", 1, 1)
    assert run.assigned_at_ms == T0 + 5
    assert mesh.state.running_on("p1") == 1
    assert mesh.state.runs[third].status == RunStatus.QUEUED
    assert [r.id for r in mesh.state.queue] == [third]
    # and the leader, ticking after it, has nothing left to place
    assert Scheduler(aging_s=0).plan(mesh.state, T0 + 5) == []


def test_without_the_replicated_policy_a_finish_only_frees_the_slot() -> None:
    """Off until the leader replicates it, so a log written before handoff
    existed replays to the same state."""
    mesh = Mesh(handoff=False)
    mesh.peer("p1")
    first, second = mesh.submit(), mesh.submit()
    mesh.start(first, "p1")
    assert mesh.finish(first) == res.Done()
    assert mesh.state.runs[second].status == RunStatus.QUEUED
    assert mesh.state.running_on("p1") == 0


def test_the_handoff_takes_the_run_the_leader_would_place_first_aging_included() -> None:
    mesh = Mesh(aging_ms=5_000)
    mesh.peer("p1")
    old_low = mesh.submit(priority=0)
    high = mesh.submit(at_ms=T0 + 10_000, priority=2)
    mesh.submit(at_ms=T0 + 10_000, priority=1)
    busy = mesh.submit(at_ms=T0 + 10_000, priority=9)
    mesh.start(busy, "p1")
    now = T0 + 12_000
    leader_first = next(iter(Scheduler(aging_s=5).order(mesh.state, now)))
    assert leader_first.id == old_low  # aged from 0 to 2, and older than high
    assert mesh.finish(busy, at_ms=now) == res.Finished(old_low)
    # without aging the same queue hands on the highest priority
    plain = Mesh()
    plain.peer("p1")
    plain.submit(priority=0)
    high = plain.submit(at_ms=T0 + 10_000, priority=2)
    busy = plain.submit(priority=9)
    plain.start(busy, "p1")
    assert plain.finish(busy, at_ms=now) == res.Finished(high)


def test_the_handoff_skips_runs_the_peer_may_not_take_and_keeps_their_place() -> None:
    mesh = Mesh(aging_ms=0)
    mesh.peer("p1", labels={"zone": "eu"})
    mesh.peer("gpu", slots=0, labels={"gpu": "a100"})
    mesh.apply(c.Configure(mesh.cid(), T0, {"capped": 0}, None, handoff=True))
    needs_gpu = mesh.submit(labels={"gpu": "a100"})
    capped = mesh.submit(tenant="capped")
    hashed = mesh.submit(placement=CONSISTENT_HASH, session="s1")
    fits = mesh.submit()
    busy = mesh.submit(priority=1)
    mesh.start(busy, "p1")
    assert mesh.finish(busy) == res.Finished(fits)
    assert [mesh.state.runs[r].status for r in (needs_gpu, capped, hashed)] == [
        RunStatus.QUEUED
    ] * 3
    assert [r.id for r in mesh.state.queue] == [needs_gpu, capped, hashed]


def test_a_draining_peer_or_one_still_full_gets_no_handoff() -> None:
    mesh = Mesh()
    mesh.peer("p1", slots=1)
    busy, queued = mesh.submit(), mesh.submit()
    mesh.start(busy, "p1")
    mesh.apply(c.PeerDrain(mesh.cid(), T0, "p1", "finish"))
    assert mesh.finish(busy) == res.Done()
    assert mesh.state.runs[queued].status == RunStatus.QUEUED

    # a peer over its slots (its slots lowered while it ran two) stays full
    over = Mesh()
    over.peer("p1", slots=2)
    a, b, waiting = over.submit(), over.submit(), over.submit()
    over.start(a, "p1")
    over.start(b, "p1")
    over.peer("p1", slots=1)
    assert over.finish(a) == res.Done()
    assert over.state.runs[waiting].status == RunStatus.QUEUED


def test_the_handoff_looks_only_at_the_head_of_the_queue() -> None:
    """Apply stays bounded: past HANDOFF_SCAN runs this peer cannot take, the
    leader's plan places the rest."""
    mesh = Mesh()
    mesh.peer("p1")
    for _ in range(HANDOFF_SCAN):
        mesh.submit(labels={"gpu": "a100"})
    beyond = mesh.submit()
    busy = mesh.submit(priority=1)
    mesh.start(busy, "p1")
    assert mesh.finish(busy) == res.Done()
    assert Scheduler(aging_s=0).plan(mesh.state, T0) == [(beyond, "p1", 1)]


def test_the_policy_survives_a_snapshot_and_an_old_snapshot_has_it_off() -> None:
    mesh = Mesh(aging_ms=7_000)
    restored = MeshState.from_dict(msgpack.unpackb(msgpack.packb(mesh.state.to_dict())))
    assert (restored.aging_ms, restored.handoff) == (7_000, True)
    old = mesh.state.to_dict()
    del old["aging_ms"], old["handoff"]
    old["v"] = 4
    assert (MeshState.from_dict(old).aging_ms, MeshState.from_dict(old).handoff) == (0, False)


def test_a_configure_with_a_bad_aging_or_handoff_is_refused_and_changes_nothing() -> None:
    state = MeshState()
    for bad in ({"aging_ms": -1}, {"aging_ms": "5"}, {"aging_ms": True}, {"handoff": 1}):
        wire = c.Configure("c", T0, {}, None).to_wire() | bad
        result = state.apply(wire | {"cid": f"c{bad}"})
        assert not result.ok, bad
        assert (state.aging_ms, state.handoff) == (0, False)


def test_the_leader_replicates_aging_and_handoff_from_its_settings() -> None:
    state = MeshState()
    state.apply(c.PeerUp("c1", T0, "p1", "i1", "r", "h", 1, {}))
    policy = Settings(id="p1", priority_aging_s=2.5).replicated_policy()
    leader = Leader("p1", "i1", Scheduler(), Liveness(2.0), policy)
    cmds = leader.tick(state, 1, T0, 0.0)
    configure = next(cmd for cmd in cmds if isinstance(cmd, c.Configure))
    assert (configure.aging_ms, configure.handoff) == (2_500, True)
    assert state.apply(configure) == res.Done()
    assert not any(isinstance(cmd, c.Configure) for cmd in leader.tick(state, 1, T0, 0.1))
    hashed = Settings(id="p1", placement=CONSISTENT_HASH).replicated_policy()
    assert hashed["handoff"] is False


def test_the_leader_holds_the_handoff_off_until_every_member_applies_it() -> None:
    """A peer of an earlier release ignores the handoff, so it would apply the
    same finish without starting the next run and its state would drift from
    the others': the leader turns the handoff on only once every member
    reports it, and off as soon as one reports without it."""
    state = MeshState()
    state.apply(c.PeerUp("c1", T0, "p1", "i1", "r1", "h1", 1, {}))
    state.apply(c.PeerUp("c2", T0, "p2", "i1", "r2", "h2", 1, {}))
    liveness = Liveness(2.0)
    leader = Leader("p1", "i1", Scheduler(), liveness, Settings(id="p1").replicated_policy())
    n = iter(range(1, 100))

    def tick() -> bool:
        for cmd in leader.tick(state, 1, T0, 0.0):
            if isinstance(cmd, c.Configure):
                assert state.apply(cmd) == res.Done()
        return state.handoff

    assert tick() is False, "p2 has not said what it applies"
    liveness.heard("p2", "i1", 0.0, frozenset({"handoff"}))
    assert tick() is True
    # p2 restarts: until the new incarnation reports, the policy stays
    state.apply(c.PeerUp(f"r{next(n)}", T0, "p2", "i2", "r2", "h2", 1, {}))
    assert tick() is True
    # ... and it came back as the earlier release, which reports no features
    liveness.heard("p2", "i2", 0.0, frozenset())
    assert tick() is False
    state.apply(c.PeerLeave(f"l{next(n)}", T0, "p2"))
    assert tick() is True, "a peer that left applies nothing any more"
