"""Placement: which queued run goes to which peer, decided by the leader.

Pure: reads a MeshState and the leader's clock and returns a proposal. The
state machine re-validates every item on apply (slots, labels, tenant caps,
epochs, backoff), so a plan made from a stale view is merely wasted, never
wrong. The only state kept here is the round-robin cursor, a cache a new
leader may start afresh.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from raftmesh.consensus.state import MeshState, Peer, Run
from raftmesh.consensus.status import RunStatus

LEAST_LOADED = "least-loaded"
ROUND_ROBIN = "round-robin"
CONSISTENT_HASH = "consistent-hash"
PLACEMENTS = (LEAST_LOADED, ROUND_ROBIN, CONSISTENT_HASH)


def labels_fit(offered: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(offered.get(k) == v for k, v in wanted.items())


def fits(peer: Peer, run: Run) -> bool:
    """The peer offers every label the run asks for and has its agent."""
    return labels_fit(peer.labels, run.labels) and peer.can_run(run.agent)


def describe_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(none)"


def affinity(key: str, peer_id: str) -> int:
    """Rendezvous (highest-random-weight) hashing: each key ranks every peer,
    so a peer leaving moves only its own keys and a peer joining takes only
    the keys it now ranks first for."""
    digest = hashlib.blake2b(f"{key}\x00{peer_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hash_key(run: Run) -> str:
    return run.session if run.session is not None else run.id


@dataclass(frozen=True)
class Waiting:
    """Why a queued run is not running yet. ``reason`` is a stable code;
    ``message`` says it to an operator and is shared by runs waiting alike."""

    reason: str
    message: str


@dataclass
class Scheduler:
    placement: str = LEAST_LOADED
    # Seconds of waiting that earn one priority level; 0 turns aging off.
    aging_s: float = 0.0
    limit: int = 500
    _cursor: str = field(default="", repr=False)

    def effective_priority(self, run: Run, now_ms: int) -> int:
        if self.aging_s <= 0:
            return run.priority
        waited_ms = max(0, now_ms - run.submitted_at_ms)
        return run.priority + int(waited_ms // (self.aging_s * 1000))

    def order(self, state: MeshState, now_ms: int) -> list[Run]:
        """Eligible queued runs: higher (aged) priority first, FIFO within one."""
        ready = [r for r in state.queued() if r.not_before_ms <= now_ms]
        ready.sort(key=lambda r: (-self.effective_priority(r, now_ms), r.submitted_at_ms, r.id))
        return ready

    def plan(self, state: MeshState, now_ms: int) -> list[tuple[str, str, int]]:
        """One assign batch: (run, peer, epoch) within free slots, labels and tenant caps."""
        # Drained and stopping peers keep their runs but get no new ones.
        up = sorted(p.id for p in state.peers.values() if p.schedulable)
        load = {pid: state.running_on(pid) for pid in up}
        free = {pid: state.peers[pid].slots - load[pid] for pid in up}
        if not any(n > 0 for n in free.values()):
            return []
        tenant_running: dict[str, int] = {}
        plan: list[tuple[str, str, int]] = []
        for run in self.order(state, now_ms):
            if len(plan) >= self.limit or not any(n > 0 for n in free.values()):
                break
            cap = state.tenant_cap(run.tenant)
            running = tenant_running.setdefault(run.tenant, state.running_for_tenant(run.tenant))
            if cap is not None and running >= cap:
                continue
            fitting = [pid for pid in up if fits(state.peers[pid], run)]
            target = self._choose(run, fitting, free, load, state)
            if target is None:
                continue
            plan.append((run.id, target, run.epoch + 1))
            load[target] += 1
            free[target] -= 1
            tenant_running[run.tenant] = running + 1
        return plan

    def _choose(
        self,
        run: Run,
        fitting: list[str],
        free: dict[str, int],
        load: dict[str, int],
        state: MeshState,
    ) -> str | None:
        placement = run.placement or self.placement
        if placement == CONSISTENT_HASH:
            # Same key, same peer while it is up: wait for its slot, never spill.
            if not fitting:
                return None
            key = hash_key(run)
            home = max(fitting, key=lambda pid: affinity(key, pid))
            return home if free[home] > 0 else None
        open_ = [pid for pid in fitting if free[pid] > 0]
        if not open_:
            return None
        if placement == ROUND_ROBIN:
            after = [pid for pid in open_ if pid > self._cursor]
            target = after[0] if after else open_[0]
            self._cursor = target
            return target
        return min(
            open_, key=lambda pid: (load[pid] / max(1, state.peers[pid].slots), load[pid], pid)
        )

    def waiting_for(self, state: MeshState, run: Run, now_ms: int) -> Waiting | None:
        """The first thing a queued run waits for, as an operator should read it."""
        if run.status != RunStatus.QUEUED:
            return None
        if run.not_before_ms > now_ms:
            return Waiting("backoff", "retry backoff after a failed attempt")
        cap = state.tenant_cap(run.tenant)
        if cap is not None and state.running_for_tenant(run.tenant) >= cap:
            return Waiting("tenant_cap", f"tenant {run.tenant!r} is at its in-flight cap of {cap}")
        up = [p for p in state.peers.values() if p.schedulable]
        if not any(p.can_run(run.agent) for p in up):
            return Waiting("agent", f"no up peer runs agent {run.agent!r}")
        fitting = sorted(p.id for p in up if fits(p, run))
        if not fitting:
            return Waiting("labels", f"no up peer offers labels {describe_labels(run.labels)}")
        if (run.placement or self.placement) == CONSISTENT_HASH:
            home = max(fitting, key=lambda pid: affinity(hash_key(run), pid))
            if state.running_on(home) >= state.peers[home].slots:
                return Waiting("slot", f"a free slot on {home} (consistent-hash placement)")
        elif all(state.running_on(pid) >= state.peers[pid].slots for pid in fitting):
            return Waiting(
                "slot", f"a free slot on a peer with labels {describe_labels(run.labels)}"
            )
        return Waiting("turn", "its turn: higher-priority or older runs go first")
