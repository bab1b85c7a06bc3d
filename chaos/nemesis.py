"""Faults, planned from a seed and then inflicted on a live mesh.

``plan`` is pure: the same seed, duration, peer count and fault kinds give the
same schedule (kinds, times, holds, variants, target choices), so a failing
run can be replayed. Which peer is *the leader* is decided by the mesh at the
moment of the fault; everything else is in the plan.

Faults never overlap (a new one starts only after the previous one healed and
a quiet gap passed), except the scenario faults that combine two on purpose
(a database outage during a failover).
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from dataclasses import dataclass
from typing import Protocol

from raftmesh.chaos.history import Fault
from raftmesh.chaos.proxy import DROPPED, REFUSED, UP

log = logging.getLogger("chaos.nemesis")

KILL = "kill"
PAUSE = "pause"
PARTITION = "partition"
LEADER = "leader"
DB = "db"
RESTART = "restart"
MEMBER = "member"
ALL_KINDS = (KILL, PAUSE, PARTITION, LEADER, DB, RESTART, MEMBER)

# (min, max) seconds a fault is held. Pauses and partitions outlast an
# election plus the default peer TTL (about 3.5 s when the leader is hit) so
# the owner's runs really are reassigned.
_HOLD_S = {
    KILL: (1.0, 5.0),
    PAUSE: (4.5, 7.0),
    PARTITION: (5.0, 8.0),
    LEADER: (1.0, 4.0),
    DB: (2.0, 5.0),
    RESTART: (0.5, 2.0),
    MEMBER: (2.0, 4.0),
}
_GAP_S = (4.0, 7.0)
_WARMUP_S = 5.0
_COOLDOWN_S = 8.0


@dataclass(frozen=True)
class PlannedFault:
    at_s: float
    kind: str
    hold_s: float
    variant: str
    # Peer indexes, shuffled by the plan; a fault uses as many as it needs.
    order: tuple[int, ...]


def plan(seed: int, duration_s: float, peers: int, kinds: tuple[str, ...]) -> list[PlannedFault]:
    """Rounds of every kind in a seeded order, until the duration is used up."""
    rng = random.Random(seed)
    schedule: list[PlannedFault] = []
    t = _WARMUP_S
    while kinds:
        round_kinds = list(kinds)
        rng.shuffle(round_kinds)
        for kind in round_kinds:
            hold = round(rng.uniform(*_HOLD_S[kind]), 2)
            if t + hold > duration_s - _COOLDOWN_S and schedule:
                return schedule
            order = list(range(peers))
            rng.shuffle(order)
            schedule.append(
                PlannedFault(round(t, 2), kind, hold, _variant(rng, kind), tuple(order))
            )
            t += hold + rng.uniform(*_GAP_S)
    return schedule


def _variant(rng: random.Random, kind: str) -> str:
    choices = {
        KILL: ["restart-late", "restart-fast"],
        PARTITION: ["isolate-minority", "isolate-leader", "split"],
        DB: ["refuse", "blackhole", "during-failover", "restart"],
        MEMBER: ["leave-join"],
        PAUSE: ["follower", "leader"],
    }.get(kind, ["-"])
    return rng.choice(choices)


class Cluster(Protocol):
    """What the nemesis needs from the harness."""

    peer_ids: list[str]

    def kill(self, peer_id: str, sig: int) -> None: ...
    def start(self, peer_id: str) -> None: ...
    def running(self, peer_id: str) -> bool: ...
    async def leader(self) -> str | None: ...
    def cut(self, src: str, dst: str, state: str) -> None: ...
    def db(self, state: str) -> None: ...
    @property
    def can_restart_db(self) -> bool: ...
    async def restart_db(self, down_s: float) -> None: ...
    async def leave(self, peer_id: str) -> None: ...
    async def join(self, replacing: str) -> str: ...


def now_ms() -> int:
    return int(time.time() * 1000)


class Nemesis:
    def __init__(self, cluster: Cluster, schedule: list[PlannedFault]) -> None:
        self.cluster = cluster
        self.schedule = schedule
        self.faults: list[Fault] = []
        # Faults that could not be inflicted; reported, never silently dropped.
        self.errors: list[str] = []

    async def run(self, started: float) -> None:
        """Inflict each planned fault at its time (``started`` is time.monotonic())."""
        for fault in self.schedule:
            delay = started + fault.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await self._inflict(fault)
            except Exception as exc:  # any failure of a fault is reported, then healed
                log.exception("fault %s failed; healing", fault.kind)
                self.errors.append(f"{fault.kind} at {fault.at_s} s: {type(exc).__name__}: {exc}")
                await self.heal()

    async def heal(self) -> None:
        """Undo whatever is still in force: resume, reconnect, restart."""
        for peer_id in self.cluster.peer_ids:
            if self.cluster.running(peer_id):
                self.cluster.kill(peer_id, signal.SIGCONT)
        for src in self.cluster.peer_ids:
            for dst in self.cluster.peer_ids:
                if src != dst:
                    self.cluster.cut(src, dst, UP)
        self.cluster.db(UP)
        for peer_id in self.cluster.peer_ids:
            if not self.cluster.running(peer_id):
                self.cluster.start(peer_id)

    def _pick(self, fault: PlannedFault, count: int, exclude: tuple[str, ...] = ()) -> list[str]:
        ids = [self.cluster.peer_ids[i] for i in fault.order]
        return [p for p in ids if p not in exclude and self.cluster.running(p)][:count]

    async def _inflict(self, fault: PlannedFault) -> None:
        c = self.cluster
        start = now_ms()
        targets: list[str] = []
        lost: list[str] = []
        detail = fault.variant
        if fault.kind in (KILL, LEADER):
            if fault.kind == LEADER:
                leader = await c.leader()
                targets = [leader] if leader else self._pick(fault, 1)
                detail = "kill -9 the leader"
            else:
                targets = self._pick(fault, 1)
                detail = f"kill -9, {fault.variant}"
            hold = 0.5 if fault.variant == "restart-fast" else fault.hold_s
            start = now_ms()
            for p in targets:
                c.kill(p, signal.SIGKILL)
            lost = targets
            await asyncio.sleep(hold)
            for p in targets:
                c.start(p)
        elif fault.kind == PAUSE:
            # A paused follower wakes still believing it owns its runs and
            # still in contact with the leader (so it does not self-fence):
            # only storage fencing stops its writes. A paused leader must
            # also be replaced by an election first.
            leader = await c.leader()
            if fault.variant == "leader" and leader:
                targets = [leader]
            else:
                targets = self._pick(fault, 1, exclude=(leader,) if leader else ())
            detail = f"SIGSTOP the {fault.variant}"
            start = now_ms()
            for p in targets:
                c.kill(p, signal.SIGSTOP)
            lost = targets
            await asyncio.sleep(fault.hold_s)
            for p in targets:
                c.kill(p, signal.SIGCONT)
        elif fault.kind == PARTITION:
            ids = self._pick(fault, len(c.peer_ids))
            minority_max = (len(c.peer_ids) - 1) // 2
            if fault.variant == "isolate-leader":
                leader = await c.leader()
                side = [leader] if leader else ids[:1]
            elif fault.variant == "split":
                side = ids[: len(ids) // 2]
            else:
                side = ids[: 1 + fault.order[0] % max(1, minority_max)]
            other = [p for p in c.peer_ids if p not in side]
            targets = side
            detail = f"{fault.variant}: {','.join(side)} | {','.join(other)}"
            start = now_ms()
            self._partition(side, other, DROPPED)
            lost = side
            await asyncio.sleep(fault.hold_s)
            self._partition(side, other, UP)
        elif fault.kind == DB:
            if fault.variant == "during-failover":
                targets = self._pick(fault, 1)
                start = now_ms()
                for p in targets:
                    c.kill(p, signal.SIGKILL)
                lost = targets
                await asyncio.sleep(0.7)
                if c.can_restart_db:
                    await c.restart_db(fault.hold_s)
                else:
                    c.db(REFUSED)
                    await asyncio.sleep(fault.hold_s)
                    c.db(UP)
                for p in targets:
                    c.start(p)
                detail = (
                    "kill -9 a peer, then the database "
                    + ("crashes and restarts" if c.can_restart_db else "goes away")
                    + " during its failover"
                )
            elif fault.variant == "restart" and c.can_restart_db:
                start = now_ms()
                await c.restart_db(fault.hold_s)
                detail = "PostgreSQL crashed (immediate stop) and restarted"
            else:
                start = now_ms()
                c.db(REFUSED if fault.variant != "blackhole" else DROPPED)
                await asyncio.sleep(fault.hold_s)
                c.db(UP)
                detail = (
                    "database unreachable (packets dropped)"
                    if fault.variant == "blackhole"
                    else "database refuses and resets connections"
                    + (
                        " (a real restart needs --storage private)"
                        if fault.variant == "restart"
                        else ""
                    )
                )
        elif fault.kind == RESTART:
            targets = list(c.peer_ids)
            start = now_ms()
            for p in targets:
                if c.running(p):
                    c.kill(p, signal.SIGKILL)
            await asyncio.sleep(fault.hold_s)
            for p in targets:
                c.start(p)
            detail = "the whole mesh killed -9 and started again"
        elif fault.kind == MEMBER:
            leader = await c.leader()
            targets = self._pick(fault, 1, exclude=(leader,) if leader else ())
            start = now_ms()
            for p in targets:
                await c.leave(p)
            await asyncio.sleep(fault.hold_s)
            joined = [await c.join(p) for p in targets]
            detail = f"{', '.join(targets)} left the mesh; {', '.join(joined)} joined under load"
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        self.faults.append(Fault(fault.kind, detail, start, now_ms(), tuple(targets), tuple(lost)))
        log.info("fault %s done: %s", fault.kind, detail)

    def _partition(self, side: list[str], other: list[str], state: str) -> None:
        for a in side:
            for b in other:
                self.cluster.cut(a, b, state)
                self.cluster.cut(b, a, state)
