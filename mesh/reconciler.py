"""This peer's side of ownership: start what the state gives it, stop what the
state took away, hand back attempts that stopped, and fence itself.

``plan`` decides from plain values (what the state says this peer owns, what
its slots run, which epochs it already attempted); ``Reconciler`` performs it
and reports every attempt's outcome back to the mesh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from raftmesh.consensus import commands
from raftmesh.consensus.eligibility import slot_idle_elsewhere
from raftmesh.consensus.model import DRAIN_RELEASE, PEER_UP
from raftmesh.consensus.spec import CONSISTENT_HASH
from raftmesh.mesh.liveness import LeaderContact
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.proposer import Proposer, new_id, now_ms
from raftmesh.runner.attempt import FENCED, RELEASED, RETRY, SUSPENDED, Assignment, Outcome
from raftmesh.runner.context import RunContext
from raftmesh.runner.slots import Slots

log = logging.getLogger("raftmesh.reconciler")

# Seconds a run held ready beyond the slots may wait here while a slot it could
# use is free on another peer, before it goes back to the queue: long enough
# that a slot free for an instant between two short runs moves nothing.
HOLD_S = 1.0

Key = tuple[str, int]


@dataclass
class Actions:
    """What one reconciliation does, in this order."""

    stop: list[str] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    cancel: list[Assignment] = field(default_factory=list)
    hand_back: list[Assignment] = field(default_factory=list)
    start: list[Assignment] = field(default_factory=list)


def plan(
    owned: list[Assignment],
    running: dict[str, int],
    attempted: set[Key],
    reporting: set[Key],
    release_all: bool,
    may_start: bool,
) -> Actions:
    """An epoch claims storage once, so an attempt of this incarnation that
    stopped is handed back (the next owner gets epoch + 1), never restarted;
    one whose outcome (or hand-back) is on its way to the log (``reporting``)
    is left alone. A run an operator asked to pause is released at its next
    step boundary, or handed back before it starts; either lands it PAUSED.
    ``owned`` is in assignment order: runs held ready beyond the slots
    (prefetch) start in the order the mesh gave them. One that has not started
    goes back unstarted when it was cancelled or its peer drains."""
    wanted = {job.run_id: job for job in owned}
    out = Actions()
    for run_id, epoch in running.items():
        job = wanted.get(run_id)
        if job is None or job.epoch != epoch:
            out.stop.append(run_id)
        elif release_all or job.pause_requested:
            out.release.append(run_id)
    if not may_start:
        return out
    for job in owned:
        key = (job.run_id, job.epoch)
        if running.get(job.run_id) == job.epoch:
            if job.cancel_requested:
                out.cancel.append(job)
        elif key in reporting:
            continue
        elif key in attempted or job.pause_requested or job.cancel_requested or release_all:
            out.hand_back.append(job)
        else:
            out.start.append(job)
    return out


class Reconciler:
    def __init__(
        self,
        peer_id: str,
        incarnation: str,
        proposer: Proposer,
        contact: LeaderContact,
        metrics: Metrics,
        capacity: int,
        attempt: Callable[..., Coroutine[Any, Any, Outcome]],
        holding_back: Callable[[], bool],
    ) -> None:
        """``attempt(job, release=..., on_context=...)`` runs one attempt;
        ``holding_back()`` is true while this peer must start nothing new
        (shutting down)."""
        self.peer_id = peer_id
        self.incarnation = incarnation
        self._proposer = proposer
        self._contact = contact
        self._metrics = metrics
        self._attempt = attempt
        self._holding_back = holding_back
        self.slots = Slots(capacity, self._execute, self._on_outcome, self._on_free)
        self._attempted: set[Key] = set()
        self._handing_back: set[Key] = set()
        # Runs held ready beyond the slots (prefetch): since when, monotonic.
        self._held_since: dict[Key, float] = {}
        self._contexts: dict[str, RunContext] = {}
        # asyncio keeps only weak references to tasks: hold detached ones here.
        self._detached: set[asyncio.Task[None]] = set()

    def reconcile(self) -> None:
        with self._proposer.read() as state:
            me = state.peers.get(self.peer_id)
            mine = me is not None and me.incarnation == self.incarnation and me.status == PEER_UP
            owned = [Assignment.of(r) for r in state.owned_by(self.peer_id)] if mine else []
            release_all = me is not None and me.drain == DRAIN_RELEASE
        running = self.slots.running()
        self._attempted &= {(job.run_id, job.epoch) for job in owned}
        may_start = not self._holding_back() and not self._contact.cut_off(time.monotonic())
        reporting = self._handing_back | self.slots.reporting()
        actions = plan(owned, running, self._attempted, reporting, release_all, may_start)
        for run_id in actions.stop:
            log.info(
                "run no longer ours: stopping it",
                extra={"run_id": run_id, "epoch": running[run_id]},
            )
            self.slots.stop(run_id)
        for run_id in actions.release:
            self.slots.release(run_id)
        for job in actions.cancel:
            self._cancel(job)
        for job in actions.hand_back:
            self._handing_back.add((job.run_id, job.epoch))
            self._detach(self._hand_back(job))
        for job in actions.start:
            if self.slots.start(job):
                self._attempted.add((job.run_id, job.epoch))
                log.info("starting run", extra={"run_id": job.run_id, "epoch": job.epoch})

    def _on_free(self) -> None:
        """A slot freed before the log heard of it: start a run this peer holds
        ready, if the state gives it more runs than are busy here."""
        with self._proposer.read() as state:
            holds_ready = state.running_on(self.peer_id) > len(self._busy())
        if holds_ready:
            self.reconcile()

    def _busy(self) -> set[Key]:
        """This peer's runs that cannot start now: running, reporting their
        outcome, or on their way back to the queue."""
        return set(self.slots.running().items()) | self.slots.reporting() | self._handing_back

    def move_held_runs(self, now: float) -> None:
        """Prefetch must not keep a run waiting behind this peer's long runs
        while another peer's slot is free: one held ready past ``HOLD_S`` in
        that case goes back to the queue (the next owner gets epoch + 1, and it
        never started, so nothing is lost). Consistent-hash runs belong here."""
        busy = self._busy()
        moving: list[Assignment] = []
        with self._proposer.read() as state:
            if state.running_on(self.peer_id) <= len(busy):
                self._held_since = {}
                return  # nothing held: the usual case, one count
            held = [
                r
                for r in state.owned_by(self.peer_id)
                if (r.id, r.epoch) not in busy and (r.id, r.epoch) not in self._attempted
            ]
            since = {(r.id, r.epoch): self._held_since.get((r.id, r.epoch), now) for r in held}
            for run in held:
                if (
                    now - since[(run.id, run.epoch)] >= HOLD_S
                    and run.spec.placement != CONSISTENT_HASH
                    and slot_idle_elsewhere(run, self.peer_id, state.peers.values(), state)
                ):
                    moving.append(Assignment.of(run))
        self._held_since = since
        for job in moving:
            log.info(
                "a slot is free elsewhere: handing back a run held here",
                extra={"run_id": job.run_id, "epoch": job.epoch},
            )
            self._handing_back.add((job.run_id, job.epoch))
            self._detach(self._hand_back(job))

    def self_fence_if_cut_off(self) -> None:
        """Correctness never depends on this (storage fences stale owners); it
        only makes the common case clean: the old attempt is gone before the
        leader gives the run to someone else."""
        if not self.slots.busy or not self._contact.cut_off(time.monotonic()):
            return
        log.warning("no contact with a leader: stopping %d runs (self-fencing)", self.slots.busy)
        for run_id, epoch in self.slots.running().items():
            log.info("self-fenced", extra={"run_id": run_id, "epoch": epoch})
            self.slots.stop(run_id)
            self._metrics.self_fenced.inc()

    async def stop(self) -> None:
        for task in list(self._detached):
            task.cancel()
        await asyncio.gather(*self._detached, return_exceptions=True)
        await self.slots.stop_all()

    def _cancel(self, job: Assignment) -> None:
        ctx = self._contexts.get(job.run_id)
        if ctx is not None and ctx.epoch == job.epoch and not ctx.cancelled:
            log.info("cancelling run", extra={"run_id": job.run_id, "epoch": job.epoch})
            ctx.cancel()

    def _detach(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def _hand_back(self, job: Assignment) -> None:
        """An attempt that stopped without an outcome (self-fenced, crashed)
        goes back to the queue for the next epoch, keeping its checkpoints."""
        log.info("releasing a stopped attempt", extra={"run_id": job.run_id, "epoch": job.epoch})
        try:
            cmd = commands.Release(new_id(), now_ms(), job.run_id, job.epoch)
            await self._proposer.propose_while(cmd, lambda: self._still_owned(job))
        finally:
            self._handing_back.discard((job.run_id, job.epoch))

    async def _execute(self, job: Assignment, release: asyncio.Event) -> Outcome:
        def track(ctx: RunContext | None) -> None:
            if ctx is not None:
                self._contexts[job.run_id] = ctx
            elif (held := self._contexts.get(job.run_id)) is not None and held.epoch == job.epoch:
                del self._contexts[job.run_id]

        return await self._attempt(job, release=release, on_context=track)

    async def _on_outcome(self, job: Assignment, outcome: Outcome) -> None:
        self._metrics.attempts.labels(outcome.status).inc()
        extra = {"run_id": job.run_id, "epoch": job.epoch}
        if outcome.status == FENCED:
            log.info("attempt fenced; a newer epoch owns the run", extra=extra)
            return
        cmd: commands.Command
        if outcome.status == RETRY:
            log.info("attempt failed (%s): %s", outcome.kind, outcome.error, extra=extra)
            cmd = commands.Fail(
                new_id(), now_ms(), job.run_id, job.epoch, outcome.kind or "error", outcome.error
            )
        elif outcome.status == RELEASED:
            log.info("run released at a step boundary", extra=extra)
            cmd = commands.Release(new_id(), now_ms(), job.run_id, job.epoch)
        elif outcome.status == SUSPENDED:
            cmd = commands.Suspend(new_id(), now_ms(), job.run_id, job.epoch, outcome.wait or {})
        else:
            log.info("run %s", outcome.status, extra=extra)
            cmd = commands.Finish(
                new_id(), now_ms(), job.run_id, job.epoch, outcome.status, outcome.error
            )
        await self._proposer.propose_while(cmd, lambda: self._still_owned(job))

    def _still_owned(self, job: Assignment) -> bool:
        with self._proposer.read() as state:
            run = state.runs.get(job.run_id)
            return run is not None and run.owner == self.peer_id and run.epoch == job.epoch
