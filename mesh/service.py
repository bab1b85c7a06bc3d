"""The API a peer serves (``PeerAPI``): submissions, runs, events, cluster views.

Any peer answers any request. Writes become replicated commands through the
proposer; reads come from the replicated state while a run is active and from
storage once it has ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

from prometheus_client import generate_latest

from raftmesh.consensus import commands
from raftmesh.consensus.eligibility import capacity
from raftmesh.consensus.model import PEER_UP
from raftmesh.consensus.results import (
    CancelRequested,
    PauseChanged,
    Rejected,
    Rejection,
    Result,
    RunOutcome,
    Submitted,
)
from raftmesh.consensus.spec import RunSpec, SpecError
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.status import (
    ACTIVE_STATUSES,
    DEAD_LETTER_STATUSES,
    TERMINAL_STATUSES,
    RunStatus,
)
from raftmesh.consensus.waits import valid_signal_name
from raftmesh.mesh import diagnostics
from raftmesh.mesh.api import SUBMIT_FIELDS, validate_submission
from raftmesh.mesh.auth import Authenticator
from raftmesh.mesh.errors import (
    BadRequest,
    Conflict,
    MeshError,
    NotLeader,
    RunNotFound,
    Unavailable,
    UnknownAgentError,
    from_storage,
    refusal,
)
from raftmesh.mesh.events import EventHub, Frame
from raftmesh.mesh.history import HistoryWriter
from raftmesh.mesh.liveness import Liveness
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.observe import THROUGHPUT_BUCKET_MS, Observer
from raftmesh.mesh.proposer import Proposer, new_id, now_ms
from raftmesh.mesh.queue_view import queue_summary, slot_use
from raftmesh.mesh.rate_limits import LeaseBook
from raftmesh.mesh.scheduler import Said, Scheduler
from raftmesh.mesh.schemas import SIGNAL_NAME_RULE, storable_text
from raftmesh.mesh.settings import Settings
from raftmesh.mesh.tracing import Tracing
from raftmesh.mesh.views import active_view, listed_status, view_from_row, view_from_state
from raftmesh.runner.payload import pack, unpack
from raftmesh.runner.registry import InvalidInput, Registry
from raftmesh.storage.base import RunRow, StorageUnavailable, Store

log = logging.getLogger("raftmesh.service")

ALL_STATUSES = ACTIVE_STATUSES | TERMINAL_STATUSES
# How long a submission waits for its history row before answering anyway.
HISTORY_WAIT_S = 1.0
# When a tenant's queue is full, a place frees as soon as one of its queued
# runs starts, usually within milliseconds; a second is the least Retry-After
# can say. (Telling a client to wait for the whole queue to drain held it for
# 60 s while places kept freeing.)
QUEUE_FULL_RETRY_AFTER_S = 1


class MeshService:
    """Implements ``mesh.api.PeerAPI`` for one peer."""

    def __init__(
        self,
        settings: Settings,
        incarnation: str,
        internal_token: str,
        proposer: Proposer,
        store: Store,
        events: EventHub,
        registry: Registry,
        scheduler: Scheduler,
        liveness: Liveness,
        metrics: Metrics,
        busy: Callable[[], int],
        wake_leader: Callable[[], None],
        observer: Observer | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """``busy()`` counts this peer's running attempts; ``wake_leader()``
        asks the leader duty to run now (to settle an outcome being waited on)."""
        self.settings = settings
        self.id = settings.id
        self.incarnation = incarnation
        self.auth = Authenticator.build(settings.api_token, settings.api_tokens_file)
        self.internal_token = internal_token
        self.max_body_bytes = settings.max_body_bytes
        self.max_streams = settings.max_streams
        self.max_streams_per_token = settings.max_streams_per_token
        self._proposer = proposer
        self.store = store
        self.events = events
        self.registry = registry
        self.scheduler = scheduler
        self.liveness = liveness
        self.metrics = metrics
        self._busy = busy
        self._wake_leader = wake_leader
        self.observer = observer if observer is not None else Observer(metrics)
        self.tracing = tracing if tracing is not None else Tracing(settings.id)
        self.history = HistoryWriter(store)
        # While this peer leads: the shares of the rate limits it leased out.
        self.rate_leases = LeaseBook(settings.rate_limits, settings.rate_limit_lease_s)

    async def close(self) -> None:
        await self.history.close()

    async def submit(self, spec: dict[str, Any]) -> tuple[str, bool]:
        """The run carries the submit span's context (``trace_parent``): the
        run's trace, whichever peers go on to run it."""
        attributes = {"agent": spec.get("agent"), "tenant": spec.get("tenant")}
        with self.tracing.span("raftmesh.run.submit", attributes):
            return await self._submit(spec)

    async def _submit(self, spec: dict[str, Any]) -> tuple[str, bool]:
        run_id, run = self._new_run(spec)
        run = dataclasses.replace(run, trace_parent=self.tracing.traceparent())
        started = time.monotonic()
        cmd = commands.Submit(new_id(), now_ms(), [{"id": run_id, **run.to_wire()}])
        with self.tracing.span("raftmesh.raft.commit", {"op": str(cmd.op)}):
            result = await self._proposer.propose(cmd)
        self.metrics.commit_seconds.observe(time.monotonic() - started)
        try:
            outcome = _one_run(result, "submission rejected", QUEUE_FULL_RETRY_AFTER_S)
        except MeshError:
            self.metrics.submissions.labels("rejected").inc()
            raise
        self.tracing.annotate(run_id=str(outcome.id), created=outcome.created)
        self.metrics.submissions.labels("created" if outcome.created else "existing").inc()
        if outcome.created:
            # Answered once the row is in storage too (or after a bound, so a
            # slow database does not hold submissions): another peer, whose
            # replica may not have applied the entry yet, finds the run there
            # instead of answering 404 to a client that reads where it did not
            # write.
            packed = dataclasses.replace(run, input=pack(run.input))
            recorded = self.history.record(RunRow(id=run_id, spec=packed, submitted_at_ms=now_ms()))
            await asyncio.wait({recorded}, timeout=HISTORY_WAIT_S)
        return str(outcome.id), outcome.created

    def _new_run(self, spec: dict[str, Any]) -> tuple[str, RunSpec]:
        """A new run id and the spec, from a validated request (absent and null
        fields take the spec's defaults)."""
        self.check_agent(spec["agent"], spec["input"])
        try:
            return new_id(), RunSpec.from_wire(spec)
        except SpecError as exc:
            raise BadRequest(str(exc)) from None

    def check_agent(self, agent: str, agent_input: Any) -> None:
        """UnknownAgentError or BadRequest unless some peer runs ``agent`` and
        this peer finds ``agent_input`` acceptable to it (a schedule is
        checked so at creation, as a run at submission)."""
        known = self.known_agents()
        if agent not in known:
            raise UnknownAgentError(
                f"unknown agent {agent!r}: no peer of this mesh has it; "
                f"agents available: {', '.join(sorted(known))}"
            )
        try:
            self.registry.check_input(agent, agent_input, self.settings.models)
        except InvalidInput as exc:
            raise BadRequest(str(exc)) from None

    async def spawn(self, spec: dict[str, Any]) -> str:
        """A child run for ``ctx.spawn`` (runner.context.MeshLink): validated like a
        submission, and retried through outages, since the parent waits for it."""
        unknown = set(spec) - SUBMIT_FIELDS.keys() - {"parent_id", "depth"}
        if unknown:
            raise BadRequest(f"spawn: unknown options {', '.join(sorted(unknown))}")
        validate_submission({k: v for k, v in spec.items() if k in SUBMIT_FIELDS})
        while True:
            try:
                run_id, _ = await self.submit(spec)
                return run_id
            except Unavailable as exc:
                log.warning("spawn deferred: %s", exc.message, extra={"run_id": spec["parent_id"]})
                await asyncio.sleep(0.2)

    async def get_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        view, _ = await self._settled_view(run_id)
        if view is None:
            row = await from_storage(self.store.get_run(run_id))
            view = view_from_row(row) if row is not None else None
        if view is None or (tenant is not None and view["tenant"] != tenant):
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        return view

    async def _check_visible(self, run_id: str, tenant: str | None) -> None:
        """RunNotFound unless the run exists and belongs to ``tenant`` (None: any)."""
        if tenant is None:
            return
        with self._proposer.read() as state:
            active = state.runs.get(run_id)
            owner_tenant = active.spec.tenant if active is not None else None
        if owner_tenant is None:
            row = await from_storage(self.store.get_run(run_id))
            owner_tenant = row.spec.tenant if row is not None else None
        if owner_tenant != tenant:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")

    async def list_runs(
        self,
        status: str | None,
        limit: int,
        tenant: str | None = None,
        agent: str | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Active runs come from the state, ended ones from storage; one page is
        cut from both, newest first, so offsets page through both. Under the
        state's lock only the runs that can be on the page are picked (by the
        fields lists filter and sort on); views are built for those alone."""
        if status is not None and status not in ALL_STATUSES:
            raise BadRequest(
                f"unknown status {status!r}; use one of {', '.join(sorted(ALL_STATUSES))}"
            )
        with self._proposer.read() as state:
            now = now_ms()
            mine = [
                r
                for r in state.runs.values()
                if (tenant is None or r.spec.tenant == tenant)
                and (agent is None or r.spec.agent == agent)
            ]
            picked = heapq.nlargest(
                offset + limit,
                (r for r in mine if status is None or listed_status(r) == status),
                key=lambda r: (r.submitted_at_ms, r.id),
            )
            said: Said = {}
            active = [active_view(state, r, self.scheduler, now, said) for r in picked]
        stored: list[dict[str, Any]] = []
        if status is None or status in TERMINAL_STATUSES:
            # Storage also holds the active runs (as queued or running rows):
            # ask for enough to fill the page after dropping them.
            rows = await from_storage(
                self.store.list_runs(status, offset + limit + len(mine), tenant=tenant, agent=agent)
            )
            with self._proposer.read() as state:
                stored = [view_from_row(r) for r in rows if r.id not in state.runs]
        views = active + stored
        views.sort(key=lambda v: v["submitted_at"] or 0, reverse=True)
        return views[offset : offset + limit]

    def follow_events(self, run_id: str, after_seq: int) -> AsyncIterator[Frame]:
        return self.events.follow(run_id, after_seq)

    async def signal(
        self,
        run_id: str,
        name: str,
        data: Any,
        idempotency_key: str | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """Store the signal, then announce it (``Signal``) so the leader wakes
        a run waiting for it. Storage first: an announced signal is always
        there to read, and a retry after a lost announcement (same key) finds
        the stored one and announces it again, harmlessly. Traced like a
        submission: the span holds the storage write and the Raft commit."""
        with self.tracing.span("raftmesh.signal", {"run_id": run_id[:140], "name": name[:140]}):
            return await self._signal(run_id, name, data, idempotency_key, tenant)

    async def _signal(
        self, run_id: str, name: str, data: Any, idempotency_key: str | None, tenant: str | None
    ) -> dict[str, Any]:
        if not valid_signal_name(name):
            raise BadRequest(f"signal name must be {SIGNAL_NAME_RULE}, got {name[:140]!r}")
        if not storable_text(run_id):
            raise RunNotFound(f"no run with id {run_id[:140]!r} in this mesh")  # none has one
        with self._proposer.read() as state:
            active = state.runs.get(run_id)
            known = (active.spec.tenant, active.status) if active is not None else None
        if known is None:
            return await self._signal_ended(run_id, name, idempotency_key, tenant)
        elif tenant is not None and known[0] != tenant:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        elif known[1] == RunStatus.SETTLING:
            return await self._signal_ended(run_id, name, idempotency_key, tenant)
        stored = await from_storage(
            self.store.put_signal(run_id, name, pack(data), idempotency_key, now_ms())
        )
        cmd = commands.Signal(new_id(), now_ms(), run_id, name, stored.seq)
        with self.tracing.span("raftmesh.raft.commit", {"op": str(cmd.op)}):
            result = await self._proposer.propose(cmd)
        self.tracing.annotate(seq=stored.seq, duplicate=not stored.created)
        if isinstance(result, Rejected):
            if result.reason == Rejection.UNKNOWN_RUN:
                return await self._signal_ended(run_id, name, idempotency_key, tenant)
            raise refusal(result.reason, f"signal refused: {result.message}")
        return {"run_id": run_id, "name": name, "seq": stored.seq, "duplicate": not stored.created}

    async def _signal_ended(
        self, run_id: str, name: str, idempotency_key: str | None, tenant: str | None
    ) -> dict[str, Any]:
        """A run that is not active takes no new signal (404, 409 or 503 as
        ``_refuse_inactive`` says), but the retry of one it was sent, with the
        same key, is answered as the duplicate it is: a client that lost the
        202 can tell delivered from refused."""
        try:
            await self._refuse_inactive(run_id, tenant)
        except Conflict:
            if idempotency_key is not None:
                for row in await from_storage(self.store.list_signals(run_id)):
                    if row.name == name and row.idempotency_key == idempotency_key:
                        return {"run_id": run_id, "name": name, "seq": row.seq, "duplicate": True}
            raise

    async def _refuse_inactive(
        self, run_id: str, tenant: str | None, refused: str = "it takes no more signals"
    ) -> NoReturn:
        """Why a run that is not active takes no signal (or pause): 409 if it ended, 404 if
        this mesh never had it (or it is another tenant's). Storage holds
        active runs too, as queued or running rows: such a row means this
        peer's replica has not applied the run yet (a peer replaying the log
        after a restart), so the answer is 503, which a client retries."""
        row = await from_storage(self.store.get_run(run_id))
        if row is None or (tenant is not None and row.spec.tenant != tenant):
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        if row.status not in TERMINAL_STATUSES:
            raise Unavailable(f"run {run_id} is not in this peer's replica yet; retry")
        raise Conflict(f"run {run_id} has {row.status}; {refused}")

    def known_agents(self) -> set[str]:
        """Agents some up peer announced, and this peer's own."""
        with self._proposer.read() as state:
            peers = [p for p in state.peers.values() if p.status == PEER_UP]
            announced = {a for p in peers for a in p.agents or ()}
        return announced | set(self.registry.names())

    def agents(self) -> dict[str, Any]:
        return {"peer": self.id, "agents": self.registry.names()}

    async def cancel_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        """Queued runs end at once; a running one is stopped by its owner."""
        await self._check_visible(run_id, tenant)
        result = await self._proposer.propose(commands.Cancel(new_id(), now_ms(), run_id))
        if isinstance(result, CancelRequested):
            status = "cancelled" if result.status == RunStatus.SETTLING else "cancelling"
            return {"id": run_id, "status": status}
        with self._proposer.read() as state:
            active = state.runs.get(run_id)
            view = view_from_state(active) if active is not None else None
        if view is not None:
            raise Conflict(f"run {run_id} cannot be cancelled: it is already {view['status']}")
        row = await from_storage(self.store.get_run(run_id))
        if row is None:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        raise Conflict(f"run {run_id} cannot be cancelled: it already {row.status}")

    async def pause_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        """A queued or waiting run is paused at once; a running one is released
        by its owner at its next step boundary (mesh/reconciler.py), which
        parks it paused with its checkpoints kept."""
        return await self._pause_or_resume(commands.Pause, run_id, tenant, "paused")

    async def resume_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        """A paused run goes back to the queue (one paused in a wait replays to
        the wait, which ends at once if it is over); a running run's pending
        pause is withdrawn."""
        return await self._pause_or_resume(commands.Resume, run_id, tenant, "resumed")

    async def _pause_or_resume(
        self,
        kind: type[commands.Pause] | type[commands.Resume],
        run_id: str,
        tenant: str | None,
        verb: str,
    ) -> dict[str, Any]:
        if not storable_text(run_id):
            raise RunNotFound(f"no run with id {run_id[:140]!r} in this mesh")  # none has one
        await self._check_visible(run_id, tenant)
        result = await self._proposer.propose(kind(new_id(), now_ms(), run_id))
        if isinstance(result, Rejected):
            if result.reason == Rejection.UNKNOWN_RUN:
                await self._refuse_inactive(run_id, tenant, f"it cannot be {verb}")
            raise refusal(result.reason, f"run {run_id} cannot be {verb}: {result.message}")
        if not isinstance(result, PauseChanged):
            raise MeshError(f"run {run_id} {verb}: unexpected answer {result!r}")
        with self._proposer.read() as state:
            active = state.runs.get(run_id)
            if active is not None:
                return active_view(state, active, self.scheduler, now_ms())
        return await self.get_run(run_id, tenant)  # cancelled meanwhile and already settled

    async def retry_run(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        """Re-queue a dead letter under its own id. Storage is reopened first,
        then the run re-enters Raft state at its stored epoch, so its next
        owner claims epoch + 1. Calling again after a failure in between is
        safe: a reopened run that never made it back into Raft is re-submitted."""
        await self._check_visible(run_id, tenant)
        view, settling = await self._settled_view(run_id)
        if settling:
            raise Unavailable(f"run {run_id}'s outcome is still being recorded; retry shortly")
        if view is not None:
            raise Conflict(
                f"run {run_id} is {view['status']}; only failed or timed_out runs can be retried"
            )
        row = await from_storage(self.store.get_run(run_id))
        if row is None:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        dead = row if row.status in DEAD_LETTER_STATUSES else None
        if dead is not None:
            await from_storage(self.store.reopen(run_id))
            row = await from_storage(self.store.get_run(run_id))
        if row is None or row.status != RunStatus.QUEUED:
            status = row.status if row is not None else "gone"
            raise Conflict(
                f"run {run_id} is {status}; only failed or timed_out runs can be retried"
            )
        wire = resubmission(row)
        result = await self._proposer.propose(commands.Submit(new_id(), now_ms(), [wire]))
        try:
            outcome = _one_run(
                result, f"run {run_id} could not be re-queued", QUEUE_FULL_RETRY_AFTER_S
            )
            if outcome.id != run_id:
                raise Conflict(
                    f"run {run_id} cannot be retried: its idempotency key now names run {outcome.id}"
                )
        except MeshError as refused:
            # Refused for good (a full tenant queue, say): the run is the dead
            # letter it was, not a queued row no replica will ever hold, which
            # every peer would take for its own replica lagging (503 forever).
            status, error = (dead.status, dead.error) if dead else (RunStatus.FAILED, None)
            finished = dead.finished_at_ms if dead and dead.finished_at_ms else now_ms()
            await from_storage(
                self.store.set_terminal(run_id, status, error or refused.message, finished)
            )
            raise
        log.info("dead letter re-queued", extra={"run_id": run_id, "epoch": row.epoch})
        return {"id": run_id, "status": RunStatus.QUEUED}

    async def _settled_view(self, run_id: str) -> tuple[dict[str, Any] | None, bool]:
        """The run's view while it is active (None once it has left the state),
        and whether it is still settling. An outcome the mesh decided but has
        not stored yet is waited out for up to the commit timeout, so that a
        terminal status comes with what storage knows of it (finished_at, the
        error); past that, the decided view is returned as it is."""
        deadline = time.monotonic() + self._proposer.commit_timeout_s
        while True:
            with self._proposer.read() as state:
                active = state.runs.get(run_id)
                if active is None:
                    return None, False
                settling = active.status == RunStatus.SETTLING
                if not settling or time.monotonic() >= deadline:
                    return active_view(state, active, self.scheduler, now_ms()), settling
            self._wake_leader()
            await asyncio.sleep(0.05)

    def cluster(self) -> dict[str, Any]:
        raft = self._proposer.raft
        leader_addr = raft.leader_addr
        now = now_ms()
        with self._proposer.read() as state:
            leader = state.peer_by_raft(leader_addr) if leader_addr else None
            peers = [
                {
                    "id": p.id,
                    "raft": p.raft,
                    "http": p.http,
                    "status": p.status,
                    "slots": p.slots,
                    # slots plus the mesh's prefetch: the runs it may hold at once
                    "capacity": capacity(p, state),
                    "running": state.running_on(p.id),
                    "labels": p.labels,
                    "role": p.role,
                    "drain": p.drain or None,
                    "stopping": p.stopping,
                }
                for p in sorted(state.peers.values(), key=lambda p: p.id)
            ]
            queue = queue_summary(state, self.scheduler, now)
            slots = slot_use(state)
            runs = runs_by_status(state)
        return {
            "self": self.id,
            "runs": runs,
            "leader": leader.id if leader else None,
            "term": raft.term,
            "voters": raft.voters(),
            "peers": peers,
            "queue": queue,
            "slots": slots,
            "placement": self.scheduler.placement,
            "prefetch": state.prefetch,
            "throughput": {
                "bucket_s": THROUGHPUT_BUCKET_MS / 1000,
                "series": self.observer.throughput_series(now),
            },
        }

    async def readiness(self) -> tuple[bool, str]:
        raft = self._proposer.raft
        if raft.leader_addr is None:
            return False, "no known Raft leader"
        with self._proposer.read() as state:
            me = state.peers.get(self.id)
            registered = (
                me is not None and me.incarnation == self.incarnation and me.status == PEER_UP
            )
        if not registered:
            return False, "this peer has not joined the replicated membership yet"
        try:
            await self.store.ping()
        except StorageUnavailable as exc:
            return False, f"storage unreachable: {exc}"
        return True, "ok"

    def heartbeat(self, report: dict[str, Any]) -> dict[str, Any]:
        """What the answer carries besides the leader's clock: the reporting
        peer's leases of the rate limits it asked for."""
        raft = self._proposer.raft
        if not raft.is_leader:
            raise NotLeader("this peer is not the leader")
        now = time.monotonic()
        try:
            self.liveness.heard(
                str(report["id"]), str(report["incarnation"]), now, _applies(report)
            )
        except KeyError as exc:
            raise BadRequest(f"heartbeat lacks {exc}") from None
        wall_ms = report.get("wall_ms")
        if isinstance(wall_ms, int | float) and not isinstance(wall_ms, bool):
            self.observer.heard_clock(str(report["id"]), wall_ms, time.time() * 1000)
        demand = _rate_demand(report.get("rate_limits") or {})
        leases = self.rate_leases.grant(str(report["id"]), demand, raft.term, now)
        return {"leases": leases, "lease_ttl_s": self.rate_leases.ttl_s}

    def metrics_text(self) -> bytes:
        raft = self._proposer.raft
        self.metrics.is_leader.set(1 if raft.is_leader else 0)
        self.metrics.term.set(raft.term)
        self.metrics.running.set(self._busy())
        self.metrics.journal_syncs.set(raft.journal.syncs)
        with self._proposer.read() as state:
            queue = queue_summary(state, self.scheduler, now_ms())
            slots = slot_use(state)
            runs = runs_by_status(state)
            peer_statuses = Counter(p.status for p in state.peers.values())
        self.metrics.set_queue(queue, slots)
        for status, n in runs.items():
            self.metrics.runs.labels(status).set(n)
        for status in PEER_STATUSES:
            self.metrics.peers.labels(status).set(peer_statuses.get(status, 0))
        self.metrics.has_leader.set(0 if raft.leader_addr is None else 1)
        progress = raft.status()
        self.metrics.raft_commit_index.set(progress["commit_idx"])
        self.metrics.raft_apply_lag.set(max(0, progress["commit_idx"] - progress["last_applied"]))
        self.metrics.raft_log_entries.set(progress["log_len"])
        pool_in_use = getattr(self.store, "pool_in_use", None)
        if pool_in_use is not None:
            in_use, size = pool_in_use()
            self.metrics.storage_pool_in_use.set(in_use)
            self.metrics.storage_pool_size.set(size)
        return generate_latest(self.metrics.registry)

    async def run_steps(self, run_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The step journal and who ran it: which peer ran which steps under
        which epoch, from storage, the only place that outlives attempts."""
        row = await from_storage(self.store.get_run(run_id))
        if row is not None and tenant is not None and row.spec.tenant != tenant:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        if row is None:
            await self.get_run(run_id, tenant)  # a run only the state knows yet: no steps
            return {"id": run_id, "steps": [], "owners": []}
        steps = await from_storage(self.store.load_steps(run_id))
        out = []
        previous: int | None = None
        for i, step in enumerate(steps):
            if i == 0 or steps[i - 1].epoch != step.epoch:
                # A stint's first step: only the latest claim's start is stored.
                previous = row.started_at_ms if step.epoch == row.epoch else None
            took = None if previous is None else max(0, step.at_ms - previous) / 1000
            out.append(
                {
                    "seq": step.seq,
                    "name": step.name,
                    "epoch": step.epoch,
                    "peer": step.peer,
                    "at": step.at_ms / 1000,
                    "took_s": took,
                }
            )
            previous = step.at_ms
        return {"id": run_id, "steps": out, "owners": owner_history(out)}

    async def diagnostics(self) -> dict[str, Any]:
        raft = self._proposer.raft
        status = raft.status()
        now = now_ms()
        now_s = time.monotonic()
        with self._proposer.read() as state:
            leader = state.peer_by_raft(raft.leader_addr) if raft.leader_addr else None
            queue = queue_summary(state, self.scheduler, now)
            leading = raft.is_leader
            peers = [
                diagnostics.PeerVitals(
                    p.id,
                    p.status,
                    p.since_ms,
                    heard_ago_s=self._heard_ago(p.id, now_s) if leading else None,
                )
                for p in sorted(state.peers.values(), key=lambda p: p.id)
            ]
        probe = self.observer.storage
        if probe.at_s is None:
            self.observer.probe_storage(self.store)
        disk = shutil.disk_usage(self.settings.data_dir)
        vitals = diagnostics.Vitals(
            now_ms=now,
            self_id=self.id,
            leader=leader.id if leader else None,
            term=raft.term,
            has_quorum=bool(status["has_quorum"]),
            peer_ttl_s=self.settings.peer_ttl_s,
            peers=peers,
            storage_latency_ms=probe.latency_ms,
            storage_error=probe.error,
            downs_recent=self.observer.recent_downs(now),
            oldest_queued_s=queue["oldest_age_s"],
            queue_sla_s=self.settings.queue_sla_s,
            clock_skews_ms=self._clock_skews(leading),
            disk_free_bytes=disk.free,
            disk_total_bytes=disk.total,
            raft_log_entries=int(status["log_len"]),
            raft_files_bytes=_files_bytes(self.settings.data_dir, RAFT_FILES),
        )
        return diagnostics.diagnose(vitals)

    def _clock_skews(self, leading: bool) -> dict[str, float]:
        """The leader hears every peer's clock; a follower knows its own, from
        the leader's acknowledgements."""
        max_age_s = 10 * self.settings.peer_ttl_s
        if leading:
            return self.observer.fresh_skews(max_age_s)
        own = self.observer.fresh_own_skew(max_age_s)
        return {} if own is None else {self.id: own}

    def _heard_ago(self, peer_id: str, now_s: float) -> float | None:
        heard = self.liveness.last_heard.get(peer_id)
        return None if heard is None else now_s - heard[1]


RAFT_FILES = ("raft.journal", "raft.dump")
PEER_STATUSES = ("up", "down", "joining", "left")


def runs_by_status(state: MeshState) -> dict[str, int]:
    """Active runs by status, every status present (0 if none), so that
    dashboards and scripts find waiting and paused whether or not any run is."""
    counts = dict.fromkeys(
        (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.SETTLING, "waiting", "paused"), 0
    )
    for run in state.runs.values():
        counts[run.status] = counts.get(run.status, 0) + 1
    return counts


def owner_history(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive steps under one (epoch, peer) as one stint of ownership."""
    out: list[dict[str, Any]] = []
    for step in steps:
        last = out[-1] if out else None
        if last is not None and (last["epoch"], last["peer"]) == (step["epoch"], step["peer"]):
            last["last_seq"] = step["seq"]
            last["steps"] += 1
        else:
            out.append(
                {
                    "epoch": step["epoch"],
                    "peer": step["peer"],
                    "first_seq": step["seq"],
                    "last_seq": step["seq"],
                    "steps": 1,
                }
            )
    return out


def _files_bytes(directory: str, names: tuple[str, ...]) -> int:
    total = 0
    for name in names:
        try:
            total += os.path.getsize(os.path.join(directory, name))
        except OSError:
            continue
    return total


def resubmission(row: RunRow) -> dict[str, Any]:
    """A stored run as a ``submit`` entry again, exactly as it was submitted:
    every field of its spec, and the epoch and attempts storage knows, so its
    next owner claims epoch + 1 and its attempts keep counting."""
    spec = dataclasses.replace(row.spec, input=unpack(row.spec.input))
    return {"id": row.id, **spec.to_wire(), "epoch": row.epoch, "attempts": row.attempts}


def _one_run(result: Result, refused: str, retry_after_s: int) -> RunOutcome:
    """The outcome of a one-run submit; a refusal, of the command or of its
    run, becomes the HTTP error of its Rejection (mesh/errors.py)."""
    if isinstance(result, Submitted):
        outcome = result.runs[0]
        if outcome.rejection is None:
            return outcome
        reason, message = outcome.rejection, str(outcome.message)
    elif isinstance(result, Rejected):
        reason, message = result.reason, result.message
    else:
        raise MeshError(f"{refused}: unexpected answer {result!r}")
    if reason == Rejection.TENANT_QUEUE_FULL:
        message = f"{message}; nothing was accepted: retry after the queue drains"
        raise refusal(reason, message, retry_after_s=retry_after_s)
    raise refusal(reason, f"{refused}: {message}")


def _rate_demand(raw: Any) -> dict[str, dict[str, int]]:
    """A heartbeat's ``rate_limits``: limit name → calls ``waiting``, ``in_use``."""
    ok = isinstance(raw, dict) and all(
        isinstance(d, dict)
        and all(isinstance(n, int) and not isinstance(n, bool) for n in d.values())
        for d in raw.values()
    )
    if not ok:
        raise BadRequest("heartbeat rate_limits must map limit names to counts of calls")
    return raw


def _applies(report: dict[str, Any]) -> frozenset[str]:
    """A peer of an earlier release reports no features: it applies none."""
    applies = report.get("applies")
    if not isinstance(applies, list):
        return frozenset()
    return frozenset(str(item) for item in applies)
