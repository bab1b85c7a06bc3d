"""Property test: tenant caps, queued maximums and slots hold in the committed state.

Random sequences of commands go through the wire form into ``MeshState``:
submissions by several tenants, assigns planned by the real scheduler (every
placement strategy) from the current state, from a deposed leader's old copy
of it and from nowhere, failed attempts (retries with backoff, dead letters),
cancels, settles, finishes, releases, peers going down or restarting with
other slot counts, and reconfiguration of caps and the retry policy.

After every command: no accepted assign took a peer above its slots or a
tenant above its in-flight cap (at that moment), no accepted submit took a
tenant above its queued maximum (requeues after a lost owner may: nothing
accepted is dropped), a run in backoff was never assigned, a
cancelled or settled run never ran again, and the state's counting indexes
equal a recount. Between reconfigurations that lower a limit, the limits
also hold globally. A replica fed the same log stays identical.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import msgpack
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from raftmesh.consensus import commands as c
from raftmesh.consensus.model import PEER_UP
from raftmesh.consensus.spec import PLACEMENTS
from raftmesh.consensus.state import MeshState, backoff_ms
from raftmesh.consensus.status import RunStatus
from raftmesh.mesh.scheduler import Said, Scheduler

PEERS = ["p0", "p1", "p2"]
TENANTS = ["t0", "t1", "t2"]
PEER_LABELS = [{}, {"gpu": "a100"}]
RUN_LABELS = [{}, {}, {"gpu": "a100"}, {"gpu": "h100"}]
LIMITS = st.none() | st.integers(0, 3)


def wire(command: Any) -> Any:
    return c.decode_entry(c.encode_entry([command]))[0]


def recount(state: MeshState) -> tuple[Counter[str], Counter[str], Counter[str]]:
    on_peer: Counter[str] = Counter()
    tenant_running: Counter[str] = Counter()
    tenant_queued: Counter[str] = Counter()
    for run in state.runs.values():
        if run.status == RunStatus.RUNNING:
            on_peer[run.owner] += 1
            tenant_running[run.spec.tenant] += 1
        elif run.status == RunStatus.QUEUED:
            tenant_queued[run.spec.tenant] += 1
    return on_peer, tenant_running, tenant_queued


class SchedulingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = MeshState()
        self.replica = MeshState()
        self.clock = 1_000_000
        self.counter = 0
        self.term = 1
        self.old_views: list[MeshState] = []
        self.incarnation: dict[str, int] = {}
        self.ended: set[str] = set()  # settled or finished: must never run again
        self.cancelled: set[str] = set()
        # Limits lowered below what was committed: exempt until back within.
        self.over_peers: set[str] = set()
        self.over_tenants: set[str] = set()

    def _cid(self) -> str:
        self.counter += 1
        return f"c{self.counter}"

    def execute(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = wire(command)
        pre = copy.deepcopy(self.state)
        result = self.state.apply(cmd)
        assert self.replica.apply(wire(command)) == result
        if cmd["op"] == c.Op.ASSIGN:
            self.check_assign(pre, cmd, result)
        if cmd["op"] == c.Op.SUBMIT:
            self.check_submit(pre, result)
        return result

    def check_assign(self, pre: MeshState, cmd: dict[str, Any], result: dict[str, Any]) -> None:
        on_peer, tenant_running, _ = recount(pre)
        for run_id in result.accepted:
            old, run = pre.runs[run_id], self.state.runs[run_id]
            peer = pre.peers[run.owner]
            on_peer[run.owner] += 1
            tenant_running[run.spec.tenant] += 1
            assert on_peer[run.owner] <= peer.slots, "assign took a peer above its slots"
            cap = pre.tenant_cap(run.spec.tenant)
            assert cap is None or tenant_running[run.spec.tenant] <= cap, (
                "assign broke a tenant cap"
            )
            assert old.status == RunStatus.QUEUED and not old.cancel_requested
            assert old.not_before_ms <= cmd["at_ms"], "a run in backoff was assigned"
            assert run_id not in self.ended and run_id not in self.cancelled
            assert peer.status == PEER_UP
            assert all(peer.labels.get(k) == v for k, v in run.spec.labels.items())

    def check_submit(self, pre: MeshState, result: dict[str, Any]) -> None:
        _, _, queued = recount(pre)
        for entry in result.runs:
            if not entry.created:
                continue
            run = self.state.runs[entry.id]
            queued[run.spec.tenant] += 1
            limit = pre.tenant_queue_limit(run.spec.tenant)
            assert limit is None or queued[run.spec.tenant] <= limit, (
                "submit broke a queued maximum"
            )

    # -- rules --------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        """Limits in force from the start, so the greedy proposals meet them."""
        for peer in PEERS:
            self.incarnation[peer] = 1
            self.execute(
                c.PeerUp(self._cid(), self.clock, peer, "i1", f"{peer}:1", f"{peer}:2", 2, {})
            )
        retry = {"backoff_base_ms": 1000, "backoff_max_ms": 8000}
        self.execute(c.Configure(self._cid(), self.clock, {"t0": 1, "t1": 2}, None, {}, 6, retry))

    @rule(data=st.data())
    def peer_up(self, data: st.DataObject) -> None:
        peer = data.draw(st.sampled_from(PEERS))
        restart = data.draw(st.booleans())
        if restart or peer not in self.incarnation:
            self.incarnation[peer] = self.incarnation.get(peer, 0) + 1
        slots = data.draw(st.integers(0, 3))
        if self.state.running_on(peer) > slots and not restart:
            self.over_peers.add(peer)
        self.execute(
            c.PeerUp(
                self._cid(),
                self.clock,
                peer,
                f"i{self.incarnation[peer]}",
                f"{peer}:1",
                f"{peer}:2",
                slots,
                data.draw(st.sampled_from(PEER_LABELS)),
            )
        )

    @rule(data=st.data())
    def peer_down(self, data: st.DataObject) -> None:
        peer = data.draw(st.sampled_from(PEERS))
        incarnation = f"i{self.incarnation.get(peer, 0)}"
        self.execute(c.PeerDown(self._cid(), self.clock, peer, incarnation))

    @rule(
        tenant=st.sampled_from(TENANTS),
        labels=st.sampled_from(RUN_LABELS),
        priority=st.integers(0, 2),
        max_attempts=st.integers(1, 3),
        count=st.integers(1, 4),
    )
    def submit(self, tenant, labels, priority, max_attempts, count) -> None:
        runs = []
        for _ in range(count):
            self.counter += 1
            runs.append(
                {
                    "id": f"r{self.counter}",
                    "agent": "echo",
                    "input": None,
                    "tenant": tenant,
                    "labels": labels,
                    "priority": priority,
                    "max_attempts": max_attempts,
                    "session": f"s{self.counter % 3}",
                }
            )
        self.execute(c.Submit(self._cid(), self.clock, runs))

    @rule(
        caps=st.dictionaries(st.sampled_from(TENANTS), st.integers(0, 3), max_size=3),
        default=LIMITS,
        queued=st.dictionaries(st.sampled_from(TENANTS), st.integers(0, 4), max_size=3),
        default_queued=LIMITS,
        base=st.sampled_from([0, 100, 1000]),
        retry_timeouts=st.booleans(),
        count_lost_owner=st.booleans(),
    )
    def configure(
        self, caps, default, queued, default_queued, base, retry_timeouts, count_lost_owner
    ):
        _, running, _ = recount(self.state)
        for tenant in TENANTS:
            cap = caps.get(tenant, default)
            if cap is not None and running[tenant] > cap:
                self.over_tenants.add(tenant)
        retry = {
            "backoff_base_ms": base,
            "backoff_max_ms": base * 8,
            "retry_timeouts": retry_timeouts,
            "count_lost_owner": count_lost_owner,
        }
        result = self.execute(
            c.Configure(self._cid(), self.clock, caps, default, queued, default_queued, retry)
        )
        assert result.ok

    @rule(placement=st.sampled_from(PLACEMENTS), aging=st.sampled_from([0.0, 1.0]))
    def assign_as_leader(self, placement: str, aging: float) -> None:
        plan = Scheduler(placement, aging).plan(self.state, self.clock)
        result = self.execute(c.Assign(self._cid(), self.clock, self.term, plan))
        # the leader's own fresh plan is valid as a whole
        assert result.accepted == [item[0] for item in plan], result.rejected

    @precondition(lambda self: self.old_views)
    @rule(data=st.data(), placement=st.sampled_from(PLACEMENTS))
    def assign_as_deposed_leader(self, data: st.DataObject, placement: str) -> None:
        view = data.draw(st.sampled_from(self.old_views))
        plan = Scheduler(placement).plan(view, self.clock - 500)
        self.execute(c.Assign(self._cid(), self.clock - 500, self.term - 1, plan))

    @rule(data=st.data())
    def assign_garbage(self, data: st.DataObject) -> None:
        runs = sorted(self.state.runs) or ["nobody"]
        batch = [
            (
                data.draw(st.sampled_from(runs)),
                data.draw(st.sampled_from(PEERS)),
                data.draw(st.integers(0, 4)),
            )
            for _ in range(data.draw(st.integers(1, 5)))
        ]
        self.execute(c.Assign(self._cid(), self.clock, self.term, batch))

    @rule(data=st.data())
    def assign_greedily(self, data: st.DataObject) -> None:
        """A deposed leader that ignores every limit: each queued run (and some
        that are not) to some peer, at the next epoch."""
        batch = [
            (run.id, data.draw(st.sampled_from(PEERS)), run.epoch + 1)
            for run in sorted(self.state.runs.values(), key=lambda r: r.id)
        ]
        self.execute(c.Assign(self._cid(), self.clock, self.term - 1, batch))

    @rule()
    def leadership_changes(self) -> None:
        self.old_views = [*self.old_views[-2:], copy.deepcopy(self.state)]
        self.term += 1

    @rule(delta=st.sampled_from([0, 50, 500, 5000]))
    def advance_clock(self, delta: int) -> None:
        self.clock += delta

    def _owned(self, data: st.DataObject) -> tuple[str, int] | None:
        running = sorted(r.id for r in self.state.runs.values() if r.status == RunStatus.RUNNING)
        if not running:
            return None
        run_id = data.draw(st.sampled_from(running))
        stale = data.draw(st.booleans())
        return run_id, self.state.runs[run_id].epoch - (1 if stale else 0)

    @rule(data=st.data(), kind=st.sampled_from(["error", "timeout"]))
    def fail(self, data: st.DataObject, kind: str) -> None:
        owned = self._owned(data)
        if owned is None:
            return
        run_id, epoch = owned
        before = copy.deepcopy(self.state.runs[run_id])
        result = self.execute(c.Fail(self._cid(), self.clock, run_id, epoch, kind, "boom"))
        if epoch != before.epoch:
            assert not result.ok
            return
        run = self.state.runs[run_id]
        if result.retry:
            if run.not_before_ms > self.clock:
                # a leader keen to rerun it at once is refused until the backoff ends
                early = [(run_id, peer, run.epoch + 1) for peer in PEERS]
                assert (
                    self.execute(c.Assign(self._cid(), self.clock, self.term, early)).accepted == []
                )
            used = self.state.retry.used(run)
            policy = self.state.retry
            expected = backoff_ms(run_id, used, policy.backoff_base_ms, policy.backoff_max_ms)
            assert run.status == RunStatus.QUEUED and run.not_before_ms == self.clock + expected
            assert used < run.spec.max_attempts
        else:
            assert run.status == RunStatus.SETTLING and run.owner is None
            assert run.outcome in ("failed", "timed_out", "cancelled")

    @rule(data=st.data(), status=st.sampled_from(["succeeded", "cancelled"]))
    def finish(self, data: st.DataObject, status: str) -> None:
        owned = self._owned(data)
        if owned is not None:
            result = self.execute(c.Finish(self._cid(), self.clock, *owned, status, None))
            if result.ok:
                self.ended.add(owned[0])

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        owned = self._owned(data)
        if owned is not None:
            self.execute(c.Release(self._cid(), self.clock, *owned))

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        runs = sorted(self.state.runs)
        if not runs:
            return
        run_id = data.draw(st.sampled_from(runs))
        before = self.state.runs[run_id].status
        result = self.execute(c.Cancel(self._cid(), self.clock, run_id))
        if result.ok:
            self.cancelled.add(run_id)
            run = self.state.runs[run_id]
            assert run.cancel_requested
            assert run.status == (
                RunStatus.SETTLING
                if before in (RunStatus.QUEUED, RunStatus.SETTLING)
                else RunStatus.RUNNING
            )

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        runs = sorted(self.state.runs)
        if not runs:
            return
        run_id = data.draw(st.sampled_from(runs))
        settling = self.state.runs[run_id].status == RunStatus.SETTLING
        result = self.execute(c.Settle(self._cid(), self.clock, run_id))
        assert result.ok == settling
        if settling:
            assert run_id not in self.state.runs
            self.ended.add(run_id)

    # -- invariants ------------------------------------------------------------

    @invariant()
    def limits_hold(self) -> None:
        state = self.state
        on_peer, running, queued = recount(state)
        assert dict(state.tenant_running) == +running
        assert dict(state.tenant_queued) == +queued
        assert {p: len(ids) for p, ids in state.by_owner.items() if ids} == dict(+on_peer)
        for peer_id, peer in state.peers.items():
            if on_peer[peer_id] <= peer.slots:
                self.over_peers.discard(peer_id)
            elif peer_id not in self.over_peers:
                raise AssertionError(f"{peer_id} runs {on_peer[peer_id]} > {peer.slots} slots")
        for tenant in TENANTS:
            cap = state.tenant_cap(tenant)
            if cap is None or running[tenant] <= cap:
                self.over_tenants.discard(tenant)
            elif tenant not in self.over_tenants:
                raise AssertionError(f"{tenant} runs {running[tenant]} > cap {cap}")
        for run in state.runs.values():
            assert run.id not in self.ended
            if run.status == RunStatus.SETTLING:
                assert run.owner is None and run.outcome is not None
            if run.status == RunStatus.RUNNING:
                assert state.peers[run.owner].status == PEER_UP

    @invariant()
    def one_answer_serves_every_run_of_a_kind(self) -> None:
        # queue_summary asks waiting_for of every queued run with one memo:
        # it must say of each run what a question of that run alone says.
        for placement in PLACEMENTS:
            scheduler = Scheduler(placement)
            said: Said = {}
            for run in self.state.runs.values():
                alone = scheduler.waiting_for(self.state, run, self.clock)
                assert scheduler.waiting_for(self.state, run, self.clock, said) == alone

    @invariant()
    def replica_and_snapshot_agree(self) -> None:
        assert self.replica.to_dict() == self.state.to_dict()
        blob = msgpack.packb(self.state.to_dict(), use_bin_type=True)
        restored = MeshState.from_dict(msgpack.unpackb(blob, raw=False, strict_map_key=False))
        assert restored.to_dict() == self.state.to_dict()
        assert restored.tenant_queued == self.state.tenant_queued
        assert restored.tenant_running == self.state.tenant_running


SchedulingMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None
)
TestScheduling = SchedulingMachine.TestCase
