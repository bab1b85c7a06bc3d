"""May this queued run go to this peer now? The one rule, in one place.

The state machine re-validates every assignment with it, the leader's
scheduler plans with it and ``waiting_for`` explains a waiting run with it,
so the three cannot drift apart: a plan the scheduler makes from a fresh view
is one that apply accepts.

Pure: the clock is the ``now_ms`` handed in, and the counts come from a
``Load`` (the replicated state, or the scheduler's view of it with the runs it
has already planned added).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from raftmesh.consensus.model import PEER_UP, Peer, Run
from raftmesh.consensus.status import RunStatus


class Why(StrEnum):
    """Why a run may not go to a peer, in the order the rule checks."""

    NOT_QUEUED = "not_queued"
    BACKOFF = "backoff"
    TENANT_CAP = "tenant_cap"
    PEER_NOT_UP = "peer_not_up"
    PEER_CLOSED = "peer_closed"
    AGENT = "agent"
    LABELS = "labels"
    SLOT = "slot"
    # Not a rule: what ``waiting_for`` says of a run nothing keeps off a peer.
    TURN = "turn"


# Decided by the run and the tenant alone: every peer gives the same answer.
RUN_WIDE = frozenset({Why.NOT_QUEUED, Why.BACKOFF, Why.TENANT_CAP})
# Decided by the peer alone: no other run can go there either.
PEER_WIDE = frozenset({Why.PEER_NOT_UP, Why.PEER_CLOSED, Why.SLOT})


@dataclass(frozen=True)
class Reason:
    code: Why
    message: str


class Load(Protocol):
    """The counts the rule reads."""

    def running_on(self, peer_id: str) -> int: ...

    def running_for_tenant(self, tenant: str) -> int: ...

    def tenant_cap(self, tenant: str) -> int | None: ...

    @property
    def prefetch(self) -> int: ...


def labels_fit(offered: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(offered.get(k) == v for k, v in wanted.items())


def describe_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(none)"


def accepts_work(peer: Peer) -> bool:
    """Up, not drained, not stopping: drained and stopping peers keep their runs
    but get no new ones."""
    return peer.status == PEER_UP and not peer.drain and not peer.stopping


def capacity(peer: Peer, load: Load) -> int:
    """The runs a peer may hold at once: its slots, and the mesh's prefetch
    behind them (runs it holds ready, so a freed slot starts the next run
    without waiting for the log). A peer without slots holds none."""
    return peer.slots + load.prefetch if peer.slots > 0 else 0


def has_room(peer: Peer, load: Load) -> bool:
    return load.running_on(peer.id) < capacity(peer, load)


def slot_idle_elsewhere(run: Run, here: str, peers: Iterable[Peer], load: Load) -> bool:
    """Is a slot, not a place in the prefetch, free on another peer that could
    run ``run``? A run held ready on a busy peer then does better back in the
    queue, where the leader places it on that slot."""
    return any(
        peer.id != here and unfit(run, peer) is None and load.running_on(peer.id) < peer.slots
        for peer in peers
    )


def why_not(run: Run, peer: Peer, load: Load, now_ms: int) -> Reason | None:
    """The first rule that keeps ``run`` off ``peer`` at ``now_ms``, or None."""
    return not_ready(run, load, now_ms) or refused_by(run, peer, load)


def not_ready(run: Run, load: Load, now_ms: int) -> Reason | None:
    """The part of the rule no peer can change (the codes in ``RUN_WIDE``)."""
    if run.status != RunStatus.QUEUED:
        return Reason(Why.NOT_QUEUED, f"run is {run.status}")
    if run.not_before_ms > now_ms:
        return Reason(Why.BACKOFF, "retry backoff after a failed attempt")
    cap = load.tenant_cap(run.spec.tenant)
    if cap is not None and load.running_for_tenant(run.spec.tenant) >= cap:
        return Reason(
            Why.TENANT_CAP, f"tenant {run.spec.tenant!r} is at its in-flight cap of {cap}"
        )
    return None


def refused_by(run: Run, peer: Peer, load: Load) -> Reason | None:
    """The part of the rule that depends on the peer, for a run that is ready."""
    unfit_here = unfit(run, peer)
    if unfit_here is not None:
        return unfit_here
    if not has_room(peer, load):
        return Reason(Why.SLOT, "peer has no free slot")
    return None


def unfit(run: Run, peer: Peer) -> Reason | None:
    """What keeps ``run`` off ``peer`` however many runs the peer holds."""
    if not accepts_work(peer):
        if peer.status != PEER_UP:
            return Reason(Why.PEER_NOT_UP, "peer is not up")
        return Reason(Why.PEER_CLOSED, "peer is draining or stopping")
    if not peer.can_run(run.spec.agent):
        return Reason(Why.AGENT, f"peer does not run agent {run.spec.agent!r}")
    if not labels_fit(peer.labels, run.spec.labels):
        return Reason(Why.LABELS, f"peer does not offer labels {describe_labels(run.spec.labels)}")
    return None
