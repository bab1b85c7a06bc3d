"""One attempt of one run on this peer, from claim to stored outcome.

The order is what makes completion exactly-once: claim the run in storage under
the new epoch (which fences every older owner), replay the journal, run the
agent, write the result fenced, and only then let the mesh propose ``finish``.
A new owner that finds a result already stored reports it without running the
agent again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from raftmesh.consensus.model import Run
from raftmesh.consensus.spec import RunSpec
from raftmesh.consensus.status import RunStatus
from raftmesh.runner.context import (
    Fenced,
    Limits,
    MeshLink,
    Released,
    RunContext,
    RunError,
    Suspending,
)
from raftmesh.runner.isolation import PROCESS, run_isolated
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.outages import retry_unavailable
from raftmesh.runner.payload import event_place, pack
from raftmesh.runner.rate_limits import Limiter
from raftmesh.runner.registry import Registry, UnknownAgent
from raftmesh.runner.spans import NO_SPANS, Spans
from raftmesh.storage.base import RunRow, StaleEpoch, Step, Store

log = logging.getLogger("raftmesh.runner")

SUCCEEDED = RunStatus.SUCCEEDED
FAILED = RunStatus.FAILED
TIMED_OUT = RunStatus.TIMED_OUT
CANCELLED = RunStatus.CANCELLED
RETRY = "retry"
FENCED = "fenced"
RELEASED = "released"
SUSPENDED = "suspended"
# A claim of epoch 1 succeeds only where storage has never seen a claim (epochs
# start at 0 and only grow), and every step and event is written under a
# claimed epoch: the first attempt of a run has nothing to replay, so it reads
# no journal and no events.
FIRST_EPOCH = 1


@dataclass(frozen=True)
class Outcome:
    """``status`` is a terminal run status (stored), RETRY (the attempt failed
    and nothing is stored: the mesh decides whether the run is retried after a
    backoff or ends as a dead letter; ``kind`` is "error" or "timeout"),
    FENCED (a newer epoch owns the run), RELEASED (handed back at a step
    boundary; not an attempt that failed) or SUSPENDED (the run waits for
    ``wait`` without a slot; every event it emitted is stored)."""

    status: str
    error: str | None = None
    kind: str | None = None
    wait: dict[str, Any] | None = None


@dataclass(frozen=True)
class Assignment:
    """What the replicated state says this peer must run: the run's spec under
    the epoch (and attempt number) this peer holds it with."""

    run_id: str
    epoch: int
    attempt: int
    spec: RunSpec
    submitted_at_ms: int = 0
    cancel_requested: bool = False
    pause_requested: bool = False

    @classmethod
    def of(cls, run: Run) -> Assignment:
        """The run as the replicated state holds it, under its current epoch."""
        return cls(
            run_id=run.id,
            epoch=run.epoch,
            attempt=run.attempts,
            spec=run.spec,
            submitted_at_ms=run.submitted_at_ms,
            cancel_requested=run.cancel_requested,
            pause_requested=run.pause_requested,
        )

    def row(self) -> RunRow:
        packed = dataclasses.replace(self.spec, input=pack(self.spec.input))
        return RunRow(id=self.run_id, spec=packed, submitted_at_ms=self.submitted_at_ms)


async def run_attempt(
    job: Assignment,
    *,
    peer_id: str,
    store: Store,
    registry: Registry,
    clock_ms: Callable[[], int],
    limits: Limits | None = None,
    mesh: MeshLink | None = None,
    default_memory_limit_mb: int = 512,
    isolation_env: tuple[str, ...] = (),
    on_context: Callable[[RunContext | None], None] | None = None,
    release: asyncio.Event | None = None,
    spans: Spans = NO_SPANS,
    models: Mapping[str, ModelEndpoint] | None = None,
    suspend_after_s: float | None = None,
    rate_limiter: Limiter | None = None,
) -> Outcome:
    """``on_context`` is told the attempt's context once the agent is about to
    start, and None when it has ended, so the peer can cancel it meanwhile.
    ``release``, once set, stops the agent before its next new step.
    ``models`` are the endpoints the peer's settings name (``ctx.models``),
    ``rate_limiter`` this peer's share of the mesh-wide limits (``ctx.limit``).
    ``suspend_after_s`` (None: never) is how long a wait must be for the run
    to leave its slot (RunContext).

    A crash of the attempt machinery itself (anything but a storage outage,
    which is waited out, or a newer epoch) is a failed attempt like an agent
    error: counted against max_attempts, so a run whose attempts keep crashing
    ends as a dead letter with the crash as its error instead of being handed
    from peer to peer forever.

    ``spans`` opens the trace spans of the agent's work (``ctx.span``)."""
    try:
        return await _attempt(
            job,
            peer_id=peer_id,
            store=store,
            registry=registry,
            clock_ms=clock_ms,
            limits=limits,
            mesh=mesh,
            default_memory_limit_mb=default_memory_limit_mb,
            isolation_env=isolation_env,
            on_context=on_context,
            release=release,
            spans=spans,
            models=models,
            suspend_after_s=suspend_after_s,
            rate_limiter=rate_limiter,
        )
    except Exception as exc:
        extra = {"run_id": job.run_id, "epoch": job.epoch}
        log.exception("attempt crashed", extra=extra)
        return Outcome(RETRY, f"attempt crashed: {type(exc).__name__}: {exc}", "error")


async def _attempt(
    job: Assignment,
    *,
    peer_id: str,
    store: Store,
    registry: Registry,
    clock_ms: Callable[[], int],
    limits: Limits | None,
    mesh: MeshLink | None,
    default_memory_limit_mb: int,
    isolation_env: tuple[str, ...],
    on_context: Callable[[RunContext | None], None] | None,
    release: asyncio.Event | None,
    spans: Spans,
    models: Mapping[str, ModelEndpoint] | None,
    suspend_after_s: float | None,
    rate_limiter: Limiter | None,
) -> Outcome:
    extra = {"run_id": job.run_id, "epoch": job.epoch}
    try:
        claim = await retry_unavailable(
            lambda: store.claim(job.row(), job.epoch, peer_id, clock_ms()), "claim"
        )
    except StaleEpoch as exc:
        log.info("not claiming: %s", exc, extra=extra)
        return Outcome(FENCED, str(exc))
    if claim.finished:
        log.info("result already stored by an earlier epoch", extra=extra)
        return Outcome(claim.run.status, claim.run.error)

    try:
        fn = registry.get(job.spec.agent)
    except UnknownAgent as exc:
        return await _store_outcome(job, store, clock_ms, Outcome(FAILED, str(exc)), None)

    journal: list[Step] = []
    stored_events: frozenset[tuple[int, int]] = frozenset()
    if job.epoch > FIRST_EPOCH:
        journal = await retry_unavailable(lambda: store.load_steps(job.run_id), "load_steps")
        stored_events = await retry_unavailable(
            lambda: _stored_places(store, job.run_id), "read_events"
        )
    ctx = RunContext(
        run_id=job.run_id,
        epoch=job.epoch,
        attempt=job.attempt,
        peer_id=peer_id,
        store=store,
        journal=journal,
        clock_ms=clock_ms,
        stored_events=stored_events,
        tenant=job.spec.tenant,
        depth=job.spec.depth,
        budget=job.spec.budget,
        limits=limits or Limits(),
        mesh=mesh,
        release=release,
        spans=spans,
        models=models,
        suspend_after_s=suspend_after_s,
        rate_limiter=rate_limiter,
    )
    if job.cancel_requested:
        ctx.cancel()
    if on_context is not None:
        on_context(ctx)
    agent_run: Awaitable[Any]
    try:
        if job.spec.isolation == PROCESS:
            memory_mb = job.spec.memory_limit_mb or default_memory_limit_mb
            agent_run = run_isolated(
                ctx, job.spec.agent, job.spec.input, memory_mb, registry, extra_env=isolation_env
            )
        else:
            agent_run = fn(ctx, job.spec.input)
        outcome, result = await _run_agent(agent_run, ctx, job)
    except Fenced as exc:
        log.info("fenced: %s", exc, extra=extra)
        return Outcome(FENCED, str(exc))
    except Released as exc:
        try:
            await ctx.drain()
        except Fenced as fenced:
            return Outcome(FENCED, str(fenced))
        return Outcome(RELEASED, str(exc))
    except Suspending as exc:
        try:
            await ctx.drain()
        except Fenced as fenced:
            return Outcome(FENCED, str(fenced))
        if ctx.cancelled:
            cancelled = Outcome(CANCELLED, "cancelled by request")
            return await _store_outcome(job, store, clock_ms, cancelled, None)
        log.info("run waits: %s", exc.wait, extra=extra)
        return Outcome(SUSPENDED, wait=exc.wait)
    except RunError as exc:  # another attempt would fail the same way
        log.info("run failed: %s", exc, extra=extra)
        return await _store_outcome(
            job, store, clock_ms, Outcome(FAILED, f"{type(exc).__name__}: {exc}"), None
        )
    finally:
        ctx.abandon()
        if on_context is not None:
            on_context(None)
    if outcome.status == RETRY:
        log.info("attempt failed: %s", outcome.error, extra=extra)
        return outcome
    return await _store_outcome(job, store, clock_ms, outcome, result)


async def _run_agent(
    agent_run: Awaitable[Any], ctx: RunContext, job: Assignment
) -> tuple[Outcome, Any]:
    """Run the agent as its own task (so ``ctx.cancel`` can stop it) under the
    run's timeout. Fenced, Released and RunError propagate; every other ending
    becomes an Outcome."""
    task = asyncio.ensure_future(agent_run)
    ctx.bind_task(task)
    try:
        async with asyncio.timeout(job.spec.timeout_s):
            result = await task
        await ctx.drain()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not ctx.cancelled or (current is not None and current.cancelling()):
            task.cancel()
            raise
        return Outcome(CANCELLED, "cancelled by request"), None
    except (Fenced, Released, RunError):
        raise
    except TimeoutError:
        if ctx.cancelled:
            return Outcome(CANCELLED, "cancelled by request"), None
        return Outcome(
            RETRY, f"attempt exceeded its timeout of {job.spec.timeout_s}s", "timeout"
        ), None
    except Exception as exc:  # the agent's own failure, reported as the run's error
        if ctx.cancelled:
            return Outcome(CANCELLED, "cancelled by request"), None
        return Outcome(RETRY, f"{type(exc).__name__}: {exc}", "error"), None
    finally:
        # However the attempt ends (the timeout itself can fail to arm: uvloop
        # refuses NaN), the agent does not outlive it.
        if not task.done():
            task.cancel()
    if ctx.cancelled:
        return Outcome(CANCELLED, "cancelled by request"), None
    return Outcome(SUCCEEDED), result


async def _stored_places(store: Store, run_id: str) -> frozenset[tuple[int, int]]:
    """Where the events stored by earlier attempts were emitted (RunContext.emit)."""
    places: set[tuple[int, int]] = set()
    last = 0
    while True:
        page = await store.read_events(run_id, after_seq=last, limit=1000)
        if not page:
            return frozenset(places)
        places.update(event_place(e.data) for e in page)
        last = page[-1].seq


async def _store_outcome(
    job: Assignment,
    store: Store,
    clock_ms: Callable[[], int],
    outcome: Outcome,
    result: Any,
) -> Outcome:
    payload = pack(result) if outcome.status == SUCCEEDED else None
    try:
        await retry_unavailable(
            lambda: store.put_result(
                job.run_id, job.epoch, outcome.status, payload, outcome.error, clock_ms()
            ),
            "put_result",
        )
    except StaleEpoch as exc:
        return Outcome(FENCED, str(exc))
    return outcome
