"""The leader's view of which peers are alive.

Peers report to the leader every heartbeat interval; a peer not heard from for
the TTL is proposed down. This view is a cache, not replicated: a new leader
starts it fresh and grants every peer a full TTL before judging it, so a leader
change never takes down healthy peers. The one exception is the leader before
it: this peer heard from it itself (its heartbeats' acknowledgements), so that
peer is judged from then, not from the election (issue 12: a dead leader's
runs waited for the election and then a full TTL).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from raftmesh.consensus.model import PEER_UP, Peer


@dataclass
class Liveness:
    ttl_s: float
    last_heard: dict[str, tuple[str, float]] = field(default_factory=dict)
    # When this leader first saw each incarnation in the state; kept apart from
    # last_heard, which holds only real reports.
    first_seen: dict[str, tuple[str, float]] = field(default_factory=dict)
    grace_until: float = 0.0
    # The leader before this one, judged without the grace: peer id -> incarnation.
    previous: dict[str, str] = field(default_factory=dict)
    # peer id -> (incarnation, what its apply does: state.APPLY_FEATURES)
    applies: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)

    def reset(self, now: float, previous: tuple[str, str, float] | None = None) -> None:
        """Called when this peer becomes leader; ``previous`` is the leader
        before it (peer id, incarnation) and when this peer last heard from it."""
        self.last_heard.clear()
        self.first_seen.clear()
        self.previous.clear()
        self.grace_until = now + self.ttl_s
        if previous is not None:
            peer_id, incarnation, heard_at = previous
            self.last_heard[peer_id] = (incarnation, heard_at)
            self.previous[peer_id] = incarnation

    def heard(
        self, peer_id: str, incarnation: str, now: float, applies: frozenset[str] | None = None
    ) -> None:
        self.last_heard[peer_id] = (incarnation, now)
        if applies is not None:
            self.applies[peer_id] = (incarnation, applies)

    def applied_everywhere(self, feature: str, members: dict[str, str], current: bool) -> bool:
        """May the state turn on an apply ``feature``? True once every member
        (id -> incarnation) reported it, False as soon as one reported without
        it (a peer of an earlier release, which says nothing of features), and
        ``current`` while some have not reported yet: a leader change or a
        restart does not flip the policy back and forth."""
        unknown = False
        for peer_id, incarnation in members.items():
            heard = self.applies.get(peer_id)
            if heard is None or heard[0] != incarnation:
                unknown = True
            elif feature not in heard[1]:
                return False
        return current if unknown else True

    def suspects(self, up_peers: dict[str, str], now: float) -> list[tuple[str, str]]:
        """``up_peers``: peer id → incarnation the state believes is up.
        Returns (peer id, incarnation) pairs silent for longer than the TTL.

        An incarnation never heard under this leader gets one TTL from when
        this leader first saw it in the state. That clock starts during the
        grace period too: otherwise a peer that died with the old leader would
        get the grace *and then* a full TTL, doubling the failover of its runs
        (found by the chaos harness).
        """
        for peer_id, incarnation in up_peers.items():
            seen = self.first_seen.get(peer_id)
            if seen is None or seen[0] != incarnation:
                self.first_seen[peer_id] = (incarnation, now)
        judged = (
            up_peers
            if now >= self.grace_until
            else {p: i for p, i in up_peers.items() if self.previous.get(p) == i}
        )
        out = []
        for peer_id, incarnation in judged.items():
            heard = self.last_heard.get(peer_id)
            if heard is None or heard[0] != incarnation:
                heard = self.first_seen[peer_id]
            if now - heard[1] > self.ttl_s:
                out.append((peer_id, incarnation))
        return out


@dataclass
class LeaderContact:
    """This peer's own side of liveness: when a leader last confirmed it.

    The leader reassigns a peer's runs once it has not heard from the peer for
    the TTL. A peer that has lost contact for most of that TTL stops its runs
    itself (self-fencing), so in the common case the old attempt is gone before
    the new one starts. Storage fencing keeps correctness when it is not.
    """

    ttl_s: float
    fence_after_fraction: float = 0.75
    confirmed_at: float | None = None
    # The peer id of the leader that confirmed it last.
    confirmed_by: str | None = None

    def confirmed(self, now: float, by: str | None = None) -> None:
        self.confirmed_at = now
        self.confirmed_by = by

    def cut_off(self, now: float) -> bool:
        """A peer that never had contact is starting up, not cut off."""
        return (
            self.confirmed_at is not None
            and now - self.confirmed_at > self.ttl_s * self.fence_after_fraction
        )

    def heard_majority(self, liveness: Liveness, peers: Iterable[Peer], now: float) -> bool:
        """For the leader: did more than half of the peers that are up report
        recently? Peers that left or are down do not count: a mesh that has
        shrunk would otherwise leave its leader forever "cut off"."""
        up = {p.id for p in peers if p.status == PEER_UP}
        recent = sum(
            1
            for peer_id, (_, at) in liveness.last_heard.items()
            if peer_id in up and now - at <= self.ttl_s / 2
        )
        return recent > len(up) / 2
