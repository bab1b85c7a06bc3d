"""What a peer notices about the mesh over time, for diagnostics and metrics.

The replicated state says what is true now; operators also ask what happened
lately (how many peers were marked down in ten minutes, how far apart the
clocks are, how slow storage answered). These are caches of one peer's
observations, never replicated and never used for a decision.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raftmesh.consensus import commands
from raftmesh.consensus.results import Finished, Rejected, Result, Submitted
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.status import RunStatus
from raftmesh.mesh.metrics import Metrics
from raftmesh.storage.base import Store

CHURN_WINDOW_MS = 10 * 60 * 1000
THROUGHPUT_BUCKET_MS = 10_000
THROUGHPUT_BUCKETS = 30  # five minutes
STORAGE_PROBE_EVERY_S = 2.0
STORAGE_PROBE_TIMEOUT_S = 2.0


@dataclass
class StorageProbe:
    latency_ms: float | None = None
    error: str | None = None
    at_s: float | None = None


@dataclass
class Observer:
    metrics: Metrics
    downs: deque[tuple[int, str]] = field(default_factory=deque)
    # peer id -> (sender wall clock minus ours at receipt, in ms; when, monotonic)
    skews_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    own_skew_ms: tuple[float, float] | None = None
    storage: StorageProbe = field(default_factory=StorageProbe)
    # bucket start (ms) -> [submitted, finished], mesh-wide: every peer applies
    # every command, so every peer can draw the same chart.
    throughput: dict[int, list[int]] = field(default_factory=dict)
    _leader: str | None = None
    _probe: asyncio.Task[None] | None = None

    def applied(self, cmds: list[Any], results: list[Result]) -> None:
        """Called with every batch this peer applies (the commands in wire
        form: one that was refused as malformed has an answer to say so)."""
        for cmd, result in zip(cmds, results, strict=False):
            if isinstance(result, Rejected):
                continue
            op = cmd.get("op")
            if op == commands.Op.PEER_DOWN:
                self.downs.append((int(cmd["at_ms"]), str(cmd["peer"])))
            elif isinstance(result, Submitted):
                created = sum(1 for r in result.runs if r.created)
                self._count(int(cmd["at_ms"]), 0, created)
            elif op in (commands.Op.FINISH, commands.Op.SETTLE):
                self._count(int(cmd["at_ms"]), 1, 1)
                if isinstance(result, Finished):
                    self.metrics.handoffs.inc()

    def _count(self, at_ms: int, which: int, n: int) -> None:
        if not n:
            return
        bucket = at_ms - at_ms % THROUGHPUT_BUCKET_MS
        self.throughput.setdefault(bucket, [0, 0])[which] += n
        while len(self.throughput) > THROUGHPUT_BUCKETS + 1:
            del self.throughput[min(self.throughput)]

    def throughput_series(self, now_ms: int) -> list[dict[str, Any]]:
        """Runs submitted and finished per bucket over the last minutes, oldest
        first, with empty buckets filled in so the chart's x axis is time."""
        last = now_ms - now_ms % THROUGHPUT_BUCKET_MS
        out = []
        for i in range(THROUGHPUT_BUCKETS - 1, -1, -1):
            start = last - i * THROUGHPUT_BUCKET_MS
            submitted, finished = self.throughput.get(start, (0, 0))
            out.append({"t": start / 1000, "submitted": submitted, "finished": finished})
        return out

    def recent_downs(self, now_ms: int) -> list[tuple[int, str]]:
        while self.downs and self.downs[0][0] < now_ms - CHURN_WINDOW_MS:
            self.downs.popleft()
        return list(self.downs)

    def tick(self, leader_addr: str | None, store: Store) -> None:
        """Every heartbeat interval: sample the leader, probe storage now and then."""
        self._leader_seen(leader_addr)
        self.probe_storage(store)

    def _leader_seen(self, leader_addr: str | None) -> None:
        """A change from one known leader to another counts."""
        if leader_addr is not None and leader_addr != self._leader:
            if self._leader is not None:
                self.metrics.leader_changes.inc()
            self._leader = leader_addr

    def heard_clock(self, peer_id: str, sender_wall_ms: float, our_wall_ms: float) -> None:
        """The leader's view of a follower's clock, from its heartbeat; one-way
        network delay is counted as skew, which on a LAN is well under a ms."""
        self.skews_ms[peer_id] = (sender_wall_ms - our_wall_ms, time.monotonic())

    def own_skew(self, skew_ms: float) -> None:
        """A follower's own clock against the leader's (from its heartbeat ack)."""
        self.own_skew_ms = (skew_ms, time.monotonic())

    def fresh_own_skew(self, max_age_s: float) -> float | None:
        if self.own_skew_ms is None or time.monotonic() - self.own_skew_ms[1] > max_age_s:
            return None
        return self.own_skew_ms[0]

    def fresh_skews(self, max_age_s: float) -> dict[str, float]:
        now = time.monotonic()
        return {p: skew for p, (skew, at) in self.skews_ms.items() if now - at <= max_age_s}

    def probe_storage(self, store: Store) -> None:
        """Start a background ping unless one ran lately; a hanging database
        must never delay the caller (the heartbeat loop)."""
        now = time.monotonic()
        due = self.storage.at_s is None or now - self.storage.at_s >= STORAGE_PROBE_EVERY_S
        if not due or (self._probe is not None and not self._probe.done()):
            return
        self._probe = asyncio.create_task(self._ping(store))

    async def _ping(self, store: Store) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(STORAGE_PROBE_TIMEOUT_S):
                await store.ping()
        except Exception as exc:  # any failure is the finding, reported as such
            self.storage = StorageProbe(None, str(exc) or type(exc).__name__, time.monotonic())
            return
        elapsed = time.monotonic() - started
        self.metrics.storage_ping.observe(elapsed)
        self.storage = StorageProbe(elapsed * 1000, None, time.monotonic())

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)


@dataclass
class Failovers:
    """The leader's record of runs whose owner it judged down, until each is
    assigned again: that wait is the failover an operator feels."""

    lost: dict[str, int] = field(default_factory=dict)

    def owner_lost(self, state: MeshState, peer_id: str, lost_at_ms: int) -> int:
        """Called before proposing peer_down; returns how many runs it orphans."""
        orphans = [
            r.id
            for r in state.runs.values()
            if r.owner == peer_id and r.status == RunStatus.RUNNING
        ]
        for run_id in orphans:
            self.lost.setdefault(run_id, lost_at_ms)
        return len(orphans)

    def resumed(self, state: MeshState) -> list[float]:
        """Seconds from loss to reassignment for every orphan that has a new owner."""
        out = []
        for run_id, lost_at in list(self.lost.items()):
            run = state.runs.get(run_id)
            if run is None:
                del self.lost[run_id]
            elif (
                run.status == RunStatus.RUNNING
                and run.assigned_at_ms
                and run.assigned_at_ms > lost_at
            ):
                out.append(max(0.0, (run.assigned_at_ms - lost_at) / 1000))
                del self.lost[run_id]
        return out


def wall_ms_of(monotonic_s: float, clock: Callable[[], float] = time.monotonic) -> int:
    """A monotonic instant as wall-clock milliseconds (for 'last heard at')."""
    return int((time.time() - (clock() - monotonic_s)) * 1000)
