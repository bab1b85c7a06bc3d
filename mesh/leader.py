"""The leader's duties: judge peers, replicate the policy, wake, assign, settle,
fire schedules.

``Leader.tick`` decides; it reads the state it is handed and its own caches
(liveness) and returns the commands to propose, in the order they must commit.
``LeaderDuty`` performs them and does the one part that needs storage first:
an outcome the mesh decided (cancelled while queued, out of retries) is written
to storage before ``settle`` lets the state forget the run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raftmesh.consensus import commands
from raftmesh.consensus.commands import COMMAND_TTL_MS
from raftmesh.consensus.model import PEER_LEFT, PEER_UP
from raftmesh.consensus.results import Assigned, Requeued, TickFired
from raftmesh.consensus.state import APPLY_FEATURES, MeshState
from raftmesh.consensus.waits import due_ms, wait_satisfied
from raftmesh.mesh.errors import from_storage
from raftmesh.mesh.liveness import LeaderContact, Liveness
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.observe import Failovers, wall_ms_of
from raftmesh.mesh.proposer import Proposer, new_id, now_ms
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.mesh.schedules import ScheduleTicker
from raftmesh.runner.attempt import Assignment
from raftmesh.storage.base import RunRow, Store

log = logging.getLogger("raftmesh.leader")

# Runs one wake names: a thousand waits ending at once take a few entries.
WAKE_BATCH = 1000


@dataclass(frozen=True)
class Decided:
    """An ending the mesh decided, waiting to be written to storage."""

    row: RunRow
    outcome: str
    message: str | None


class Leader:
    """Leader-only decisions. Its caches (liveness) are rebuilt by every new
    leader from the replicated state, so losing them loses nothing."""

    def __init__(
        self,
        peer_id: str,
        incarnation: str,
        scheduler: Scheduler,
        liveness: Liveness,
        policy: dict[str, Any],
        contact: LeaderContact | None = None,
    ) -> None:
        """``contact``: this peer's own contact with the leaders before it."""
        self.peer_id = peer_id
        self.incarnation = incarnation
        self.scheduler = scheduler
        self.liveness = liveness
        self.contact = contact
        self.policy = policy
        self._was_leader = False
        self.ticker = ScheduleTicker()
        # Set by each tick: when the earliest timer of a waiting run is due.
        self.next_due_ms: int | None = None

    def tick(
        self, state: MeshState, term: int | None, now_ms: int, now_s: float
    ) -> list[commands.Command]:
        """``term`` is None when this peer does not lead; ``now_s`` is monotonic."""
        leading = term is not None
        if leading and not self._was_leader:
            self.liveness.reset(now_s, self._previous_leader(state))
            log.info("became leader", extra={"term": term})
        self._was_leader = leading
        if term is None:
            self.next_due_ms = None
            return []
        self.liveness.heard(self.peer_id, self.incarnation, now_s, APPLY_FEATURES)
        up = {p.id: p.incarnation for p in state.peers.values() if p.status == PEER_UP}
        out: list[commands.Command] = []
        for peer_id, incarnation in self.liveness.suspects(up, now_s):
            log.warning("peer %s silent for %.1fs: marking it down", peer_id, self.liveness.ttl_s)
            out.append(commands.PeerDown(new_id(), now_ms, peer_id, incarnation))
        policy = self._policy(state)
        if _policy_of(state) != policy:
            out.append(commands.Configure(new_id(), now_ms, **policy))
        due, self.next_due_ms = _wakeable(state, now_ms)
        for at in range(0, len(due), WAKE_BATCH):
            out.append(commands.Wake(new_id(), now_ms, due[at : at + WAKE_BATCH]))
        plan = self.scheduler.plan(state, now_ms)
        if plan:
            out.append(commands.Assign(new_id(), now_ms, term, plan))
        # Replicated schedules: the ticks due now (apply fires each at most once).
        out.extend(self.ticker.due(state, now_ms))
        return out

    def _previous_leader(self, state: MeshState) -> tuple[str, str, float] | None:
        """The leader this peer last reported to, while the state holds it up:
        its id, incarnation, and when it last acknowledged this peer."""
        contact = self.contact
        if contact is None or contact.confirmed_by in (None, self.peer_id):
            return None
        peer = state.peers.get(contact.confirmed_by or "")
        if peer is None or peer.status != PEER_UP or contact.confirmed_at is None:
            return None
        return peer.id, peer.incarnation, contact.confirmed_at

    def _policy(self, state: MeshState) -> dict[str, Any]:
        """The configured policy, with the handoff, the prefetch and the short
        command window held off until every peer that applies the log (voters,
        executors, joiners; down ones too: they catch up on it) applies them
        alike."""
        gated: dict[str, Any] = {
            "handoff": False,
            "prefetch": 0,
            "command_ttl_ms": COMMAND_TTL_MS,
        }
        wanted = {k for k, off in gated.items() if self.policy.get(k, off) != off}
        if not wanted:
            return self.policy
        members = {p.id: p.incarnation for p in state.peers.values() if p.status != PEER_LEFT}
        policy = dict(self.policy)
        for feature, off in gated.items():
            if feature in wanted:
                current = getattr(state, feature) != off
                if not self.liveness.applied_everywhere(feature, members, current):
                    policy[feature] = off
        return policy

    @staticmethod
    def decided(state: MeshState) -> list[Decided]:
        return [
            Decided(
                Assignment.of(r).row(),
                r.outcome or "failed",
                "cancelled by request" if r.outcome == "cancelled" else r.last_error,
            )
            for r in state.settling()
        ]


def _wakeable(state: MeshState, now_ms: int) -> tuple[list[str], int | None]:
    """The waiting runs whose wait is over, and the earliest time after
    ``now_ms`` another one's ends by the clock (the leader ticks then, not only
    on its period): one pass over the waiting runs for both."""
    due: list[str] = []
    earliest: int | None = None
    for run in state.waiting_runs():
        if wait_satisfied(run, state, now_ms):
            due.append(run.id)
        elif (at := due_ms(run)) is not None and at > now_ms:
            earliest = at if earliest is None else min(earliest, at)
    return due, earliest


def _policy_of(state: MeshState) -> dict[str, Any]:
    return {
        "tenant_caps": state.tenant_caps,
        "default_tenant_cap": state.default_tenant_cap,
        "tenant_max_queued": state.tenant_max_queued,
        "default_tenant_max_queued": state.default_tenant_max_queued,
        "retry": dict(state.retry.__dict__),
        "aging_ms": state.aging_ms,
        "handoff": state.handoff,
        "prefetch": state.prefetch,
        "command_ttl_ms": state.command_ttl_ms,
    }


class LeaderDuty:
    """Performs what ``Leader.tick`` decides, on every change and on a short tick."""

    def __init__(
        self,
        leader: Leader,
        proposer: Proposer,
        store: Store,
        metrics: Metrics,
        wake: Callable[[], None] | None = None,
    ) -> None:
        """``wake()`` makes the peer run ``run_once`` soon: called when the
        earliest timer of a waiting run is due."""
        self.leader = leader
        self._proposer = proposer
        self._store = store
        self._metrics = metrics
        self._failovers = Failovers()
        self._wake = wake
        self._timer: asyncio.TimerHandle | None = None

    async def run_once(self) -> None:
        raft = self._proposer.raft
        with self._proposer.read() as state:
            term = raft.term if raft.is_leader else None
            now = now_ms()
            cmds = self.leader.tick(state, term, now, time.monotonic())
            self._track_failovers(state, cmds)
            self._set_timer(self.leader.next_due_ms, now)
        # Proposed together, so they share one log entry and commit in order.
        results = await asyncio.gather(
            *(self._proposer.propose(c) for c in cmds), return_exceptions=True
        )
        for cmd, result in zip(cmds, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            if isinstance(cmd, commands.PeerDown) and isinstance(result, Requeued):
                self._metrics.peers_down.inc()
                self._metrics.failovers.inc(result.requeued)
            elif isinstance(result, Assigned) and result.rejected:
                log.debug("assignments rejected on apply: %s", result.rejected)
            elif isinstance(cmd, commands.FireTick) and isinstance(result, TickFired):
                # A fired tick is routine; a dropped one is worth an operator's eye.
                log.log(
                    logging.DEBUG if result.run else logging.INFO,
                    "schedule %s tick %d: %s",
                    cmd.schedule,
                    cmd.tick_ms,
                    f"run {result.run}" if result.run else f"skipped ({result.skipped})",
                )
            elif cmd.op == commands.Op.CONFIGURE:
                log.info("scheduling policy replicated: %s", result)
        if term is not None:
            # Last, so that an unreachable database delays only these outcomes.
            await self._settle_decided()

    def _set_timer(self, due: int | None, now: int) -> None:
        """Tick again when the next timer is due: a timer wakes within a Raft
        round trip of its due time, whatever the tick period."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if due is not None and self._wake is not None:
            self._timer = asyncio.get_running_loop().call_later((due - now) / 1000, self._wake)

    def _track_failovers(self, state: MeshState, cmds: list[commands.Command]) -> None:
        """An orphan's loss dates from its owner's last report, not from the verdict."""
        for cmd in cmds:
            if isinstance(cmd, commands.PeerDown):
                heard = self.leader.liveness.last_heard.get(cmd.peer)
                lost_at = wall_ms_of(heard[1]) if heard is not None else now_ms()
                self._failovers.owner_lost(state, cmd.peer, lost_at)
        for seconds in self._failovers.resumed(state):
            self._metrics.failover_duration.observe(seconds)

    async def _settle_decided(self) -> None:
        """Storage first: a leader that dies in between leaves the run settling
        for the next one, which writes the same outcome again."""
        with self._proposer.read() as state:
            decided = Leader.decided(state)
        for item in decided:
            await from_storage(self._store.record_runs([item.row]))
            await from_storage(
                self._store.set_terminal(item.row.id, item.outcome, item.message, now_ms())
            )
            await self._proposer.propose(commands.Settle(new_id(), now_ms(), item.row.id))
            self._metrics.runs_finished.labels(item.outcome).inc()
            log.info(
                "run %s (decided by the mesh)",
                item.outcome,
                extra={"run_id": item.row.id, "epoch": item.row.epoch},
            )
