"""Placement: which queued run goes to which peer, decided by the leader.

Pure: reads a MeshState and the leader's clock and returns a proposal. Which
peers a run may go to at all is ``consensus.eligibility.why_not``, the rule
the state machine re-validates every item with on apply, so a plan made from
a fresh view is accepted and one made from a stale view is merely wasted,
never wrong. This module only chooses among the eligible peers. The only
state kept here is the round-robin cursor, a cache a new leader may start
afresh.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from raftmesh.consensus.eligibility import (
    Reason,
    Why,
    accepts_work,
    describe_labels,
    has_room,
    not_ready,
    refused_by,
    why_not,
)
from raftmesh.consensus.model import Run
from raftmesh.consensus.spec import CONSISTENT_HASH, LEAST_LOADED, ROUND_ROBIN
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.status import RunStatus


def affinity(key: str, peer_id: str) -> int:
    """Rendezvous (highest-random-weight) hashing: each key ranks every peer,
    so a peer leaving moves only its own keys and a peer joining takes only
    the keys it now ranks first for."""
    digest = hashlib.blake2b(f"{key}\x00{peer_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hash_key(run: Run) -> str:
    return run.spec.session if run.spec.session is not None else run.id


class _Planned:
    """The state's counts plus the runs this plan has placed so far, so each
    item is judged as apply will judge it after the items before it."""

    def __init__(self, state: MeshState) -> None:
        self._state = state
        self._on_peer: Counter[str] = Counter()
        self._for_tenant: Counter[str] = Counter()

    def running_on(self, peer_id: str) -> int:
        return self._state.running_on(peer_id) + self._on_peer[peer_id]

    def running_for_tenant(self, tenant: str) -> int:
        return self._state.running_for_tenant(tenant) + self._for_tenant[tenant]

    def tenant_cap(self, tenant: str) -> int | None:
        return self._state.tenant_cap(tenant)

    @property
    def prefetch(self) -> int:
        return self._state.prefetch

    def place(self, run: Run, peer_id: str) -> None:
        self._on_peer[peer_id] += 1
        self._for_tenant[run.spec.tenant] += 1


# What the peers say of a kind of ready run: see ``Scheduler.waiting_for``.
Said = dict[tuple[str, tuple[tuple[str, str], ...], str], Reason]


@dataclass
class Scheduler:
    placement: str = LEAST_LOADED
    # Seconds of waiting that earn one priority level; 0 turns aging off.
    aging_s: float = 0.0
    limit: int = 500
    _cursor: str = field(default="", repr=False)

    @property
    def aging_ms(self) -> int:
        return round(self.aging_s * 1000) if self.aging_s > 0 else 0

    def order(self, state: MeshState, now_ms: int) -> Iterator[Run]:
        """Queued runs, higher (aged) priority first, FIFO within one; lazy,
        so a plan that fills the free slots reads only the runs it places."""
        return state.queue.ordered(now_ms, self.aging_ms)

    def plan(self, state: MeshState, now_ms: int) -> list[tuple[str, str, int]]:
        """One assign batch: (run, peer, epoch), each item eligible after the ones before it."""
        open_peers = [
            state.peers[pid] for pid in sorted(state.peers) if accepts_work(state.peers[pid])
        ]
        load = _Planned(state)
        if not any(has_room(p, load) for p in open_peers):
            # The leader ticks on every applied entry: with every slot taken
            # (the usual case under load) ordering the queue is all it would do.
            return []
        plan: list[tuple[str, str, int]] = []
        for run in self.order(state, now_ms):
            if len(plan) >= self.limit or not any(has_room(p, load) for p in open_peers):
                break
            verdicts = {p.id: why_not(run, p, load, now_ms) for p in open_peers}
            target = self._choose(run, verdicts, load, state)
            if target is None:
                continue
            plan.append((run.id, target, run.epoch + 1))
            load.place(run, target)
        return plan

    def _choose(
        self,
        run: Run,
        verdicts: dict[str, Reason | None],
        load: _Planned,
        state: MeshState,
    ) -> str | None:
        placement = run.spec.placement or self.placement
        if placement == CONSISTENT_HASH:
            # Same key, same peer while it is up: wait for its slot, never spill.
            home = _home(run, verdicts)
            return home if home is not None and verdicts[home] is None else None
        open_ = [pid for pid, verdict in verdicts.items() if verdict is None]
        if not open_:
            return None
        if placement == ROUND_ROBIN:
            after = [pid for pid in open_ if pid > self._cursor]
            target = after[0] if after else open_[0]
            self._cursor = target
            return target
        return min(
            open_,
            key=lambda pid: (
                load.running_on(pid) / max(1, state.peers[pid].slots),
                load.running_on(pid),
                pid,
            ),
        )

    def waiting_for(
        self, state: MeshState, run: Run, now_ms: int, said: Said | None = None
    ) -> Reason | None:
        """The first thing a queued run waits for, said of the whole mesh.

        What the peers say of a ready run depends only on its agent, labels and
        placement, unless the placement is consistent-hash (its key picks the
        peer). A caller asking of many runs passes one ``said`` to all, so it is
        worked out once per kind of run: ``/metrics`` asks it of every queued
        run, and 15,000 of them held the event loop for 30 ms and more."""
        if run.status != RunStatus.QUEUED:
            return None
        reason = not_ready(run, state, now_ms)
        if reason is not None:
            return reason
        placement = run.spec.placement or self.placement
        if said is None or placement == CONSISTENT_HASH:
            return self._peers_say(state, run, placement)
        kind = (run.spec.agent, tuple(sorted(run.spec.labels.items())), placement)
        if kind not in said:
            said[kind] = self._peers_say(state, run, placement)
        return said[kind]

    def _peers_say(self, state: MeshState, run: Run, placement: str) -> Reason:
        verdicts = {
            pid: refused_by(run, state.peers[pid], state)
            for pid in sorted(state.peers)
            if accepts_work(state.peers[pid])
        }
        if all(v is not None and v.code == Why.AGENT for v in verdicts.values()):
            return Reason(Why.AGENT, f"no up peer runs agent {run.spec.agent!r}")
        home = _home(run, verdicts)
        if home is None:
            return Reason(
                Why.LABELS, f"no up peer offers labels {describe_labels(run.spec.labels)}"
            )
        if placement == CONSISTENT_HASH:
            if verdicts[home] is not None:
                return Reason(Why.SLOT, f"a free slot on {home} (consistent-hash placement)")
        elif all(v is not None for v in verdicts.values()):
            return Reason(
                Why.SLOT, f"a free slot on a peer with labels {describe_labels(run.spec.labels)}"
            )
        return Reason(Why.TURN, "its turn: higher-priority or older runs go first")


def _home(run: Run, verdicts: dict[str, Reason | None]) -> str | None:
    """The peer a consistent-hash run belongs on: the one its key ranks first
    among those it may go to once a slot frees (None if there is none)."""
    fitting = [pid for pid, v in verdicts.items() if v is None or v.code == Why.SLOT]
    if not fitting:
        return None
    key = hash_key(run)
    return max(fitting, key=lambda pid: affinity(key, pid))
