"""The leader's books of the mesh-wide rate limits: who holds which share.

Pure: no I/O, no clock (every time is handed in, monotonic seconds). The
leader calls ``LeaseBook.grant`` for each heartbeat; what it returns goes back
to the peer in the heartbeat's answer (runner/rate_limits.py spends it).

A peer granted a bucket of capacity ``c`` refilled at ``r`` per second admits
at most ``c + 60 r`` in any minute. The one rule that keeps the mesh under a
rate of R per minute: what the peers may still be spending (for each peer the
largest capacity and the largest rate among its grants not yet expired) never
adds up to more than R. For a concurrency count the same holds of the counts
granted and of the calls each peer last reported running. A grant is
therefore only ever cut to fit what the other peers hold; a share taken from
one peer (because another now wants some) becomes free only when that peer's
larger grant expires. A dead peer loses its share the same way, one TTL after
its last grant, with no Raft commit at any point.

A new leader knows nothing of the grants its predecessor made, so it grants
nothing for one TTL (the books start afresh on every term).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from raftmesh.runner.rate_limits import RateLimit

INF = float("inf")
# The burst: this many seconds of a rate may be spent at once, mesh-wide (but
# at least one request for each peer sharing it, at most half the rate). The
# refill is the rest, so the steady rate is the burst below the limit.
BURST_S = 3.0
# The window a rate per minute is kept over.
WINDOW_S = 60.0


@dataclass(frozen=True)
class Bucket:
    """A peer's part of a rate: ``capacity`` at once, ``per_s`` refill."""

    capacity: float = 0.0
    per_s: float = 0.0

    def per_minute(self) -> float:
        return self.capacity + 60 * self.per_s


@dataclass(frozen=True)
class Grant:
    requests: Bucket
    tokens: Bucket
    concurrent: int
    expires: float


@dataclass
class _Peer:
    grants: list[Grant] = field(default_factory=list)
    in_use: int = 0
    waiting: int = 0
    heard: float = -INF

    def held(self, key: str, now: float) -> Bucket:
        """The most this peer may be spending: every unexpired grant counts
        for the refill; for the capacity, every grant of the last window. A
        burst spent just before its grant expired is still in the window: were
        it given out again at once, as refill elsewhere, that window would hold
        the burst twice."""
        live = [getattr(g, key) for g in self.grants if g.expires > now]
        recent = [getattr(g, key) for g in self.grants]
        return Bucket(
            max((b.capacity for b in recent), default=0.0),
            max((b.per_s for b in live), default=0.0),
        )

    def held_count(self, now: float) -> int:
        return max((g.concurrent for g in self.grants if g.expires > now), default=0)


class LeaseBook:
    def __init__(self, limits: Mapping[str, RateLimit], ttl_s: float) -> None:
        self.limits = dict(limits)
        self.ttl_s = ttl_s
        self._term: int | None = None
        self._granting_from = INF
        self._peers: dict[str, dict[str, _Peer]] = {name: {} for name in self.limits}

    def grant(
        self, peer: str, demand: Mapping[str, Mapping[str, int]], term: int, now: float
    ) -> dict[str, dict[str, Any]]:
        """The leases for ``peer``, which reported ``demand`` (limit name →
        ``waiting``, ``in_use``), as sent on the wire: per limit ``requests``
        and ``tokens`` as [capacity, refill per second], and ``concurrent``."""
        if term != self._term:
            self._term = term
            self._granting_from = now + self.ttl_s
            self._peers = {name: {} for name in self.limits}
        for name, peers in self._peers.items():
            me = peers.setdefault(peer, _Peer())
            wants = demand.get(name)
            if wants is not None:
                me.heard, me.in_use = now, int(wants.get("in_use", 0))
            me.waiting = int(wants.get("waiting", 0)) if wants is not None else 0
            for p in peers.values():
                p.grants = [g for g in p.grants if g.expires > now - WINDOW_S]
        if now < self._granting_from:
            return {}
        out = {}
        for name, limit in self.limits.items():
            if name in demand:
                grant = self._grant_one(limit, self._peers[name], peer, now)
                self._peers[name][peer].grants.append(grant)
                out[name] = wire(limit, grant)
        return out

    def _grant_one(self, limit: RateLimit, peers: dict[str, _Peer], peer: str, now: float) -> Grant:
        # Peers asking for a share: more calls waiting first, then by name.
        wanting = sorted(
            (q for q, p in peers.items() if now - p.heard <= self.ttl_s),
            key=lambda q: (-peers[q].waiting, q),
        )
        others = [p for q, p in peers.items() if q != peer]
        requests = tokens = Bucket()
        if limit.rpm is not None:
            requests = _fit_rate(
                limit.rpm, 1.0, peer, wanting, peers[peer], others, "requests", now
            )
        if limit.tpm is not None:
            tokens = _fit_rate(limit.tpm, 0.0, peer, wanting, peers[peer], others, "tokens", now)
        concurrent = 0
        if limit.concurrent is not None:
            running = sum(
                max(p.held_count(now), p.in_use if now - p.heard <= self.ttl_s else 0)
                for p in others
            )
            target = _fair_count(limit.concurrent, wanting.index(peer), len(wanting))
            concurrent = max(0, min(target, limit.concurrent - running))
        return Grant(requests, tokens, concurrent, now + self.ttl_s)


def _fit_rate(
    per_minute: float,
    unit: float,
    peer: str,
    wanting: list[str],
    me: _Peer,
    others: list[_Peer],
    key: str,
    now: float,
) -> Bucket:
    """An even share of a rate for ``peer``, cut to what the others leave.

    ``unit`` is the smallest thing taken at once (one request): a share of
    capacity below it could never be spent, so a rate too small for every
    wanting peer to hold a unit is shared by as many as it can hold."""
    holders = wanting
    if unit > 0:
        holders = wanting[: max(1, math.floor(per_minute / (2 * unit)))]
    if peer not in holders:
        return Bucket()
    n = len(holders)
    burst = min(max(per_minute * BURST_S / 60, n * unit), per_minute / 2)
    target = Bucket(burst / n, (per_minute - burst) / 60 / n)
    room = per_minute - sum(p.held(key, now).per_minute() for p in others)
    mine = me.held(key, now)
    capacity = max(0.0, min(target.capacity, room - 60 * mine.per_s))
    if capacity < unit - 1e-9:  # what float sums lose must not cost a whole share
        return Bucket()
    per_s = max(0.0, min(target.per_s, (room - max(mine.capacity, capacity)) / 60))
    return Bucket(capacity, per_s)


def wire(limit: RateLimit, grant: Grant) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if limit.rpm is not None:
        out["requests"] = [grant.requests.capacity, grant.requests.per_s]
    if limit.tpm is not None:
        out["tokens"] = [grant.tokens.capacity, grant.tokens.per_s]
    if limit.concurrent is not None:
        out["concurrent"] = grant.concurrent
    return out


def _fair_count(total: int, rank: int, wanting: int) -> int:
    """The part of ``total`` for the peer at ``rank`` among ``wanting`` peers:
    an even split, the remainder to the first ranks (most calls waiting)."""
    base, extra = divmod(total, wanting)
    return base + (1 if rank < extra else 0)
