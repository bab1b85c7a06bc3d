"""A peer may hold the mesh's prefetch of runs beyond its slots, ready to start
the moment a slot frees, instead of after the finish and the next assignment
have gone through the log (issue 12). These build states through ``apply``,
plan as the leader does, and drive the peer's slots with real asyncio tasks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.eligibility import slot_idle_elsewhere
from raftmesh.consensus.spec import RunSpec
from raftmesh.consensus.state import MAX_PREFETCH, MeshState
from raftmesh.consensus.status import RunStatus
from raftmesh.mesh.leader import Leader
from raftmesh.mesh.liveness import Liveness
from raftmesh.mesh.reconciler import plan
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.mesh.settings import Settings, SettingsError
from raftmesh.runner.attempt import Assignment, Outcome
from raftmesh.runner.slots import Slots

T0 = 1_000_000


class Mesh:
    def __init__(self, prefetch: int) -> None:
        self.state = MeshState()
        self.n = 0
        self.apply(c.Configure(self.cid(), T0, {}, None, handoff=True, prefetch=prefetch))

    def apply(self, cmd: c.Command | dict[str, Any]) -> Any:
        wire = cmd.to_wire() if isinstance(cmd, c.Command) else cmd
        return self.state.apply(msgpack.unpackb(msgpack.packb(wire)))

    def cid(self) -> str:
        self.n += 1
        return f"c{self.n}"

    def peer(self, peer_id: str, slots: int) -> None:
        self.apply(c.PeerUp(self.cid(), T0, peer_id, "i1", "r" + peer_id, "h", slots, {}))

    def submit(self, count: int) -> list[str]:
        runs = [{"id": f"r{self.n:03d}-{i}", "agent": "echo", "input": None} for i in range(count)]
        self.apply(c.Submit(self.cid(), T0, runs))
        return [r["id"] for r in runs]

    def assign(self, run_id: str, peer_id: str, at_ms: int = T0) -> res.Assigned:
        epoch = self.state.runs[run_id].epoch + 1
        result: res.Assigned = self.apply(
            c.Assign(self.cid(), at_ms, 1, [(run_id, peer_id, epoch)])
        )
        return result


def test_a_peer_holds_its_slots_plus_the_prefetch_and_no_more() -> None:
    mesh = Mesh(prefetch=2)
    mesh.peer("p1", slots=2)
    runs = mesh.submit(5)
    assert [bool(mesh.assign(r, "p1").accepted) for r in runs] == [True] * 4 + [False]
    assert mesh.assign(runs[4], "p1").rejected == {runs[4]: "peer has no free slot"}
    assert mesh.state.running_on("p1") == 4


def test_without_prefetch_a_peer_holds_its_slots_and_a_slotless_peer_none_either_way() -> None:
    off = Mesh(prefetch=0)
    off.peer("p1", slots=2)
    runs = off.submit(3)
    assert [bool(off.assign(r, "p1").accepted) for r in runs] == [True, True, False]
    on = Mesh(prefetch=3)
    on.peer("router", slots=0)
    assert not on.assign(on.submit(1)[0], "router").accepted


def test_the_leader_fills_free_slots_everywhere_before_any_prefetch() -> None:
    mesh = Mesh(prefetch=2)
    mesh.peer("p1", slots=2)
    mesh.peer("p2", slots=2)
    mesh.submit(9)
    placed = Scheduler(aging_s=0).plan(mesh.state, T0)
    peers = [peer for _, peer, _ in placed]
    assert len(placed) == 8, "slots plus prefetch on both peers, the ninth waits"
    assert sorted(peers[:4]) == ["p1", "p1", "p2", "p2"], "each peer's slots first"
    assert mesh.apply(c.Assign(mesh.cid(), T0, 1, placed)).rejected == {}


def test_a_finish_hands_the_freed_room_on_so_the_peer_stays_full() -> None:
    mesh = Mesh(prefetch=1)
    mesh.peer("p1", slots=1)
    first, second, third = mesh.submit(3)
    mesh.assign(first, "p1")
    mesh.assign(second, "p1")
    run = mesh.state.runs[first]
    finished = mesh.apply(c.Finish(mesh.cid(), T0 + 9, first, run.epoch, "succeeded", None))
    assert finished == res.Finished(third)
    assert [r.id for r in mesh.state.owned_by("p1")] == [second, third], "assignment order"


def test_the_prefetch_survives_a_snapshot_an_older_one_has_none_and_bad_values_are_refused() -> (
    None
):
    mesh = Mesh(prefetch=3)
    restored = MeshState.from_dict(msgpack.unpackb(msgpack.packb(mesh.state.to_dict())))
    assert restored.prefetch == 3
    old = mesh.state.to_dict()
    del old["prefetch"]
    old["v"] = 5
    assert MeshState.from_dict(old).prefetch == 0
    for bad in (-1, "2", True, MAX_PREFETCH + 1, 2.5):
        wire = c.Configure(mesh.cid(), T0, {}, None).to_wire() | {"prefetch": bad}
        assert not mesh.apply(wire).ok, bad
        assert mesh.state.prefetch == 3


def test_the_leader_replicates_the_prefetch_only_once_every_member_applies_it() -> None:
    """A replica of an earlier release counts slots alone, so it would refuse an
    assignment into the prefetch that the others accept, and drift from them."""
    mesh = Mesh(prefetch=0)
    mesh.peer("p1", slots=1)
    mesh.peer("p2", slots=1)
    liveness = Liveness(2.0)
    policy = Settings(id="p1", prefetch=4).replicated_policy()
    leader = Leader("p1", "i1", Scheduler(), liveness, policy)

    def tick() -> tuple[int, bool]:
        for cmd in leader.tick(mesh.state, 1, T0, 0.0):
            if isinstance(cmd, c.Configure):
                assert mesh.apply(cmd) == res.Done()
        return mesh.state.prefetch, mesh.state.handoff

    assert tick() == (0, True), "p2 has not said what it applies: the prefetch stays off"
    liveness.heard("p2", "i1", 0.0, frozenset({"handoff"}))
    assert tick() == (0, True), "the release before this one: handoff, no prefetch"
    liveness.heard("p2", "i1", 0.0, frozenset({"handoff", "prefetch"}))
    assert tick() == (4, True)


def test_settings_bound_the_prefetch() -> None:
    assert Settings(id="p1").replicated_policy()["prefetch"] == 0
    for bad in (-1, MAX_PREFETCH + 1):
        try:
            Settings(id="p1", prefetch=bad)
        except SettingsError as exc:
            assert "prefetch" in str(exc)
        else:
            raise AssertionError(f"prefetch={bad} accepted")


def job(run_id: str, **flags: bool) -> Assignment:
    return Assignment(run_id=run_id, epoch=1, attempt=1, spec=RunSpec("echo"), **flags)


def test_a_held_run_goes_back_unstarted_when_cancelled_or_its_peer_drains() -> None:
    cancelled = job("b", cancel_requested=True)
    actions = plan([job("a"), cancelled, job("c")], {"a": 1}, {("a", 1)}, set(), False, True)
    assert actions.hand_back == [cancelled] and actions.start == [job("c")]
    draining = plan([job("a"), job("c")], {"a": 1}, {("a", 1)}, set(), True, True)
    assert draining.release == ["a"] and draining.hand_back == [job("c")]
    assert draining.start == []


def test_an_ended_attempt_whose_outcome_is_on_its_way_is_neither_restarted_nor_handed_back() -> (
    None
):
    actions = plan([job("a"), job("b")], {}, {("a", 1)}, {("a", 1)}, False, True)
    assert actions.hand_back == [] and actions.start == [job("b")]


async def test_a_slot_frees_when_the_outcome_is_known_not_when_the_log_has_it() -> None:
    reported: dict[str, asyncio.Event] = {"a": asyncio.Event(), "b": asyncio.Event()}
    ran: list[str] = []
    freed: list[int] = []

    async def execute(job: Assignment, release: asyncio.Event) -> Outcome:
        ran.append(job.run_id)
        return Outcome("succeeded")

    async def on_outcome(job: Assignment, outcome: Outcome) -> None:
        await reported[job.run_id].wait()  # the finish waiting for its commit

    slots: Slots
    slots = Slots(1, execute, on_outcome, lambda: freed.append(slots.busy))
    assert slots.start(job("a"))
    assert not slots.start(job("b")), "one slot"
    await asyncio.sleep(0.01)
    assert ran == ["a"] and slots.running() == {} and slots.reporting() == {("a", 1)}
    assert freed == [1], "freed while a's outcome still reports"
    assert slots.busy == 1, "shutdown still waits for the report"
    assert slots.start(job("b"))
    await asyncio.sleep(0.01)
    assert ran == ["a", "b"] and slots.reporting() == {("a", 1), ("b", 1)}
    reported["a"].set()
    await asyncio.sleep(0.01)
    assert slots.reporting() == {("b", 1)}
    await slots.stop_all()
    assert slots.busy == 0


async def test_a_crashed_attempt_frees_its_slot_and_reports_nothing() -> None:
    outcomes: list[str] = []
    freed: list[bool] = []

    async def execute(job: Assignment, release: asyncio.Event) -> Outcome:
        raise RuntimeError("agent bug")

    async def on_outcome(job: Assignment, outcome: Outcome) -> None:
        outcomes.append(job.run_id)

    slots = Slots(1, execute, on_outcome, lambda: freed.append(True))
    assert slots.start(job("a"))
    await asyncio.sleep(0.01)
    assert freed == [True] and outcomes == [] and slots.busy == 0


def test_a_run_held_ready_keeps_its_queued_order_on_the_peer() -> None:
    mesh = Mesh(prefetch=2)
    mesh.peer("p1", slots=1)
    late, early = mesh.submit(2)
    mesh.assign(early, "p1", at_ms=T0 + 1)
    mesh.assign(late, "p1", at_ms=T0 + 2)
    assert [r.id for r in mesh.state.owned_by("p1")] == [early, late]
    assert {r.status for r in mesh.state.owned_by("p1")} == {RunStatus.RUNNING}


def test_a_slot_is_idle_elsewhere_only_on_an_open_peer_that_could_run_the_run() -> None:
    mesh = Mesh(prefetch=1)
    mesh.peer("here", slots=1)
    mesh.peer("full", slots=1)
    run_id, filler = mesh.submit(2)
    mesh.assign(filler, "full")
    run = mesh.state.runs[run_id]
    peers = mesh.state.peers
    assert not slot_idle_elsewhere(run, "here", peers.values(), mesh.state), "only a prefetch place"
    mesh.peer("gpu", slots=2)
    peers["gpu"].labels = {"gpu": "1"}
    assert slot_idle_elsewhere(run, "here", peers.values(), mesh.state)
    run.spec = RunSpec("echo", labels={"zone": "b"})
    assert not slot_idle_elsewhere(run, "here", peers.values(), mesh.state), "labels do not fit"
    run.spec = RunSpec("echo")
    peers["gpu"].drain = "finish"
    assert not slot_idle_elsewhere(run, "here", peers.values(), mesh.state), "draining"
