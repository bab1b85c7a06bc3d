"""The peer process: wires Raft, storage, the runner and the HTTP API.

Every peer is identical. Each applies the replicated log and learns its own
assignments by applying them (no hand-over RPC); the one that leads also runs
the scheduler and the liveness checks. All of it is driven by one asyncio loop;
the Raft tick thread reaches it only through RaftNode's notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from prometheus_client import generate_latest

from raftmesh.consensus import commands
from raftmesh.consensus.errors import NoQuorum, ProposalFailed
from raftmesh.consensus.model import DRAIN_RELEASE, PEER_UP, VOTER, Run
from raftmesh.consensus.raft import RaftNode, persisted_voters
from raftmesh.consensus.status import DEAD_LETTER_STATUSES, TERMINAL_STATUSES, RunStatus
from raftmesh.mesh import logs
from raftmesh.mesh.api import SUBMIT_FIELDS, build_app, validate_submission
from raftmesh.mesh.errors import (
    BadRequest,
    Conflict,
    NoQuorumError,
    NotLeader,
    RunNotFound,
    StorageDown,
    TooManyRequests,
    Unavailable,
    UnknownAgentError,
)
from raftmesh.mesh.events import EventHub, Frame
from raftmesh.mesh.liveness import LeaderContact, Liveness
from raftmesh.mesh.membership import Membership, check_not_left
from raftmesh.mesh.membership_api import add_membership_routes
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.queue_view import queue_summary, slot_use
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.mesh.settings import Settings
from raftmesh.runner.attempt import FENCED, RELEASED, RETRY, Assignment, Outcome, run_attempt
from raftmesh.runner.context import Limits, RunContext, pack, unpack
from raftmesh.runner.registry import default_registry
from raftmesh.runner.slots import Slots
from raftmesh.storage import open_store
from raftmesh.storage.base import RunRow, StorageUnavailable

log = logging.getLogger("raftmesh.peer")

ACTIVE_STATUSES = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})
ALL_STATUSES = ACTIVE_STATUSES | TERMINAL_STATUSES


def now_ms() -> int:
    return int(time.time() * 1000)


def _new_id() -> str:
    return uuid.uuid4().hex


def _iso_s(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class Peer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.id = settings.id
        self.incarnation = _new_id()
        secret, self.dev_secret = settings.effective_secret()
        self._secret = secret
        self.internal_token = hmac.new(
            secret.encode(), b"raftmesh-internal-v1", hashlib.sha256
        ).hexdigest()
        self.api_token = settings.api_token
        self.max_body_bytes = settings.max_body_bytes
        self.metrics = Metrics()
        self.metrics.slots.set(settings.slots)
        self.registry = default_registry(settings.agent_modules)
        if settings.unsafe_disable_fencing:
            log.warning("UNSAFE: fencing is disabled; stale owners can overwrite runs")
        self.store = open_store(
            settings.storage, unsafe_disable_fencing=settings.unsafe_disable_fencing
        )
        self.slots = Slots(settings.slots, self._execute, self._on_outcome)
        self.events = EventHub(self.store, settings.events_poll_s)
        self.liveness = Liveness(settings.peer_ttl_s)
        self.contact = LeaderContact(settings.peer_ttl_s)
        # (run, epoch) attempts started by this incarnation: an epoch claims
        # storage once, so a stopped attempt is released, never restarted.
        self._attempted: set[tuple[str, int]] = set()
        self._releasing: set[tuple[str, int]] = set()
        self.scheduler = Scheduler(settings.placement, settings.priority_aging_s)
        self._contexts: dict[str, RunContext] = {}
        self.raft: RaftNode | None = None
        self._leader_wake = asyncio.Event()
        self._reconcile_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._was_leader = False
        self._background: list[asyncio.Task[None]] = []
        # asyncio keeps only weak references to tasks: hold detached ones here.
        self._detached: set[asyncio.Task[None]] = set()
        self._http: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.membership = Membership(self)
        self.exit_requested = asyncio.Event()

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        if self.dev_secret:
            log.warning("no --secret given: using the development secret (loopback only)")
        check_not_left(self.settings.data_dir)
        # The voters this data dir last saw beat the command line, which may
        # predate joins and leaves (or, for a joined peer, name only the seed).
        partners = persisted_voters(self.settings.data_dir) or list(self.settings.peers)
        voter = self.settings.role == VOTER
        if not voter and not partners:
            raise SystemExit("an executor needs --peers: the voters' Raft addresses")
        await self._open_store()
        await self.events.start()
        self.raft = RaftNode(
            self.settings.raft if voter else None,
            partners,
            self.settings.data_dir,
            self._secret,
            asyncio.get_running_loop(),
            self._on_raft_change,
            commit_timeout_s=self.settings.commit_timeout_s,
            dial=dict(self.settings.dial),
        )
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        app = build_app(self)
        add_membership_routes(app, self)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        host, port = _host_port(self.settings.http)
        await web.TCPSite(self._http, host, port, reuse_address=True).start()
        for loop_fn in (self._heartbeat_loop, self._leader_loop, self._reconcile_loop):
            self._background.append(asyncio.create_task(loop_fn(), name=loop_fn.__name__))
        log.info(
            "peer started: raft %s, http %s, %d slots, storage %s",
            self.settings.raft,
            self.settings.http,
            self.settings.slots,
            self.settings.storage.split("@")[-1],
        )

    async def _open_store(self) -> None:
        delay = 0.2
        deadline = time.monotonic() + 60
        while True:
            try:
                await self.store.open()
                return
            except StorageUnavailable as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("storage not reachable yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 3.0)

    async def stop(self) -> None:
        self._stopping.set()
        self.events.close()
        tasks = [*self._background, *self._detached]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.slots.stop_all()
        if self._http is not None:
            await self._http.cleanup()
        if self._client is not None:
            await self._client.close()
        if self.raft is not None:
            self.raft.close()
        await self.store.close()
        log.info("peer stopped")

    def request_exit(self) -> None:
        """Ends the process once the current request has been answered."""
        asyncio.get_running_loop().call_later(0.2, self.exit_requested.set)

    def _on_raft_change(self, cmds: list[commands.Command], results: list[dict[str, Any]]) -> None:
        self._leader_wake.set()
        self._reconcile_wake.set()

    def _raft(self) -> RaftNode:
        assert self.raft is not None, "peer not started"
        return self.raft

    # -- proposing --------------------------------------------------------

    async def _propose(
        self, cmd: commands.Command, budget_s: float | None = None
    ) -> dict[str, Any]:
        """Commit ``cmd``, retrying ambiguous outcomes with the same cid (the
        state machine applies a cid once) until the budget runs out."""
        budget = self.settings.commit_timeout_s if budget_s is None else budget_s
        deadline = time.monotonic() + budget
        while True:
            try:
                return await self._raft().propose(cmd)
            except NoQuorum as exc:
                if time.monotonic() >= deadline:
                    raise NoQuorumError(
                        f"the mesh could not commit in {budget:.0f}s ({exc}); "
                        "a majority of peers must be up and connected — retry shortly"
                    ) from exc
                await asyncio.sleep(0.1)
            except ProposalFailed as exc:
                raise Unavailable(f"the mesh refused the request: {exc}") from exc

    async def _propose_while(self, cmd: commands.Command, relevant: Callable[[], bool]) -> None:
        """Keep proposing until committed or no longer relevant (or stopping)."""
        while not self._stopping.is_set() and relevant():
            try:
                await self._propose(cmd)
                return
            except Unavailable as exc:
                log.warning("retrying %s: %s", cmd["op"], exc.message)
                await asyncio.sleep(0.2)

    # -- API surface (mesh.api.PeerAPI) -------------------------------------

    async def submit(self, spec: dict[str, Any]) -> tuple[str, bool]:
        run = self._new_run(spec)
        started = time.monotonic()
        result = await self._propose(commands.submit(_new_id(), now_ms(), [run]))
        self.metrics.commit_seconds.observe(time.monotonic() - started)
        outcome = result["runs"][0] if result.get("ok") else {"error": result.get("error")}
        if "error" in outcome:
            self.metrics.submissions.labels("rejected").inc()
            if outcome.get("code") == "tenant_queue_full":
                raise TooManyRequests(
                    f"{outcome['error']}; nothing was accepted: retry after the queue drains",
                    retry_after_s=self._retry_after_s(run["tenant"]),
                )
            raise BadRequest(f"submission rejected: {outcome['error']}")
        self.metrics.submissions.labels("created" if outcome["created"] else "existing").inc()
        if outcome["created"]:
            self._detach(self._record_submitted(run, now_ms()))
        return outcome["id"], outcome["created"]

    def _new_run(self, spec: dict[str, Any]) -> dict[str, Any]:
        known = self.known_agents()
        if spec["agent"] not in known:
            raise UnknownAgentError(
                f"unknown agent {spec['agent']!r}: no peer of this mesh has it; "
                f"agents available: {', '.join(sorted(known))}"
            )
        return {
            "id": _new_id(),
            "agent": spec["agent"],
            "input": spec["input"],
            "tenant": spec.get("tenant") or "default",
            "priority": spec.get("priority") or 0,
            "labels": spec.get("labels") or {},
            "timeout_s": spec.get("timeout_s"),
            "max_attempts": spec.get("max_attempts") or 1,
            "idempotency_key": spec.get("idempotency_key"),
            "parent_id": spec.get("parent_id"),
            "depth": spec.get("depth") or 0,
            "budget": spec.get("budget"),
            "isolation": spec.get("isolation") or "task",
            "memory_limit_mb": spec.get("memory_limit_mb"),
            "session": spec.get("session"),
            "placement": spec.get("placement"),
        }

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

    def _retry_after_s(self, tenant: str) -> int:
        """A hint, not a promise: time for the tenant's in-flight cap to take one
        more round of its queue at a nominal second per run, within 1..60 s."""
        with self._raft().lock:
            state = self._raft().state
            queued = state.queued_for_tenant(tenant)
            cap = state.tenant_cap(tenant) or 1
        return max(1, min(60, -(-queued // max(1, cap))))

    async def _record_submitted(self, run: dict[str, Any], at_ms: int) -> None:
        """History for queued runs; best effort, since the owner's claim
        inserts the row anyway."""
        row = RunRow(
            id=run["id"],
            agent=run["agent"],
            input=pack(run["input"]),
            tenant=run["tenant"],
            priority=run["priority"],
            labels=run["labels"],
            timeout_s=run["timeout_s"],
            max_attempts=run["max_attempts"],
            idempotency_key=run["idempotency_key"],
            parent_id=run["parent_id"],
            submitted_at_ms=at_ms,
        )
        try:
            await self.store.record_runs([row])
        except Exception as exc:  # history is advisory here; the claim writes it for real
            log.warning("could not record run history: %s", exc, extra={"run_id": run["id"]})

    async def get_run(self, run_id: str) -> dict[str, Any]:
        with self._raft().lock:
            state = self._raft().state
            active = state.runs.get(run_id)
            view = self._view(state, active) if active is not None else None
        if view is not None:
            return view
        row = await self._storage(self.store.get_run(run_id))
        if row is None:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        return _view_from_row(row)

    async def list_runs(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        if status is not None and status not in ALL_STATUSES:
            raise BadRequest(
                f"unknown status {status!r}; use one of {', '.join(sorted(ALL_STATUSES))}"
            )
        with self._raft().lock:
            state = self._raft().state
            active = [self._view(state, r) for r in state.runs.values()]
        active = [v for v in active if status is None or v["status"] == status]
        stored: list[dict[str, Any]] = []
        if status is None or status in TERMINAL_STATUSES:
            rows = await self._storage(self.store.list_runs(status, limit))
            seen = {v["id"] for v in active}
            stored = [_view_from_row(r) for r in rows if r.id not in seen]
        views = active + stored
        views.sort(key=lambda v: v["submitted_at"] or 0, reverse=True)
        return views[:limit]

    def follow_events(self, run_id: str, after_seq: int) -> AsyncIterator[Frame]:
        return self.events.follow(run_id, after_seq)

    def known_agents(self) -> set[str]:
        """Agents some up peer announced, and this peer's own."""
        with self._raft().lock:
            peers = [p for p in self._raft().state.peers.values() if p.status == PEER_UP]
            announced = {a for p in peers for a in p.agents or ()}
        return announced | set(self.registry.names())

    def agents(self) -> dict[str, Any]:
        return {"peer": self.id, "agents": self.registry.names()}

    def _view(self, state: Any, run: Run) -> dict[str, Any]:
        view = _view_from_state(run)
        waiting = self.scheduler.waiting_for(state, run, now_ms())
        view["waiting_for"] = None if waiting is None else waiting.message
        return view

    async def cancel_run(self, run_id: str) -> dict[str, Any]:
        """Queued runs end at once; a running one is stopped by its owner."""
        result = await self._propose(commands.cancel(_new_id(), now_ms(), run_id))
        if result.get("ok"):
            status = "cancelled" if result["status"] == RunStatus.SETTLING else "cancelling"
            return {"id": run_id, "status": status}
        with self._raft().lock:
            active = self._raft().state.runs.get(run_id)
            view = _view_from_state(active) if active is not None else None
        if view is not None:
            raise Conflict(f"run {run_id} cannot be cancelled: it is already {view['status']}")
        row = await self._storage(self.store.get_run(run_id))
        if row is None:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        raise Conflict(f"run {run_id} cannot be cancelled: it already {row.status}")

    async def retry_run(self, run_id: str) -> dict[str, Any]:
        """Re-queue a dead letter under its own id. Storage is reopened first,
        then the run re-enters Raft state at its stored epoch, so its next
        owner claims epoch + 1. Calling again after a failure in between is
        safe: a reopened run that never made it back into Raft is re-submitted."""
        view = await self._settled_view(run_id)
        if view is not None:
            raise Conflict(
                f"run {run_id} is {view['status']}; only failed or timed_out runs can be retried"
            )
        row = await self._storage(self.store.get_run(run_id))
        if row is None:
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        if row.status in DEAD_LETTER_STATUSES:
            await self._storage(self.store.reopen(run_id))
            row = await self._storage(self.store.get_run(run_id))
        if row is None or row.status != RunStatus.QUEUED:
            status = row.status if row is not None else "gone"
            raise Conflict(
                f"run {run_id} is {status}; only failed or timed_out runs can be retried"
            )
        spec = {
            "id": row.id,
            "agent": row.agent,
            "input": unpack(row.input),
            "tenant": row.tenant,
            "priority": row.priority,
            "labels": dict(row.labels),
            "timeout_s": row.timeout_s,
            "max_attempts": row.max_attempts,
            "parent_id": row.parent_id,
            "epoch": row.epoch,
            "attempts": row.attempts,
        }
        result = await self._propose(commands.submit(_new_id(), now_ms(), [spec]))
        outcome = result["runs"][0] if result.get("ok") else {"error": result.get("error")}
        if "error" in outcome:
            if outcome.get("code") == "tenant_queue_full":
                raise TooManyRequests(
                    f"{outcome['error']}; retry after the queue drains",
                    retry_after_s=self._retry_after_s(row.tenant),
                )
            raise Conflict(f"run {run_id} could not be re-queued: {outcome['error']}")
        log.info("dead letter re-queued", extra={"run_id": run_id, "epoch": row.epoch})
        return {"id": run_id, "status": RunStatus.QUEUED}

    async def _settled_view(self, run_id: str) -> dict[str, Any] | None:
        """The run's view while it is active, after waiting out a settling
        outcome (decided, not yet in storage) for up to the commit timeout."""
        deadline = time.monotonic() + self.settings.commit_timeout_s
        while True:
            with self._raft().lock:
                active = self._raft().state.runs.get(run_id)
                view = _view_from_state(active) if active is not None else None
                settling = active is not None and active.status == RunStatus.SETTLING
            if not settling:
                return view
            if time.monotonic() >= deadline:
                raise Unavailable(f"run {run_id}'s outcome is still being recorded; retry shortly")
            self._leader_wake.set()
            await asyncio.sleep(0.05)

    async def _storage(self, op: Any) -> Any:
        try:
            return await op
        except StorageUnavailable as exc:
            raise StorageDown(f"storage is unreachable: {exc}") from exc

    def cluster(self) -> dict[str, Any]:
        raft = self._raft()
        leader_addr = raft.leader_addr
        now = now_ms()
        with raft.lock:
            state = raft.state
            leader = state.peer_by_raft(leader_addr) if leader_addr else None
            peers = [
                {
                    "id": p.id,
                    "raft": p.raft,
                    "http": p.http,
                    "status": p.status,
                    "slots": p.slots,
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
        return {
            "self": self.id,
            "leader": leader.id if leader else None,
            "term": raft.term,
            "voters": raft.voters(),
            "peers": peers,
            "queue": queue,
            "slots": slots,
            "placement": self.scheduler.placement,
        }

    async def readiness(self) -> tuple[bool, str]:
        raft = self._raft()
        if raft.leader_addr is None:
            return False, "no known Raft leader"
        with raft.lock:
            me = raft.state.peers.get(self.id)
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

    def heartbeat(self, report: dict[str, Any]) -> None:
        if not self._raft().is_leader:
            raise NotLeader("this peer is not the leader")
        try:
            self.liveness.heard(str(report["id"]), str(report["incarnation"]), time.monotonic())
        except KeyError as exc:
            raise BadRequest(f"heartbeat lacks {exc}") from None

    def metrics_text(self) -> bytes:
        raft = self._raft()
        self.metrics.is_leader.set(1 if raft.is_leader else 0)
        self.metrics.term.set(raft.term)
        self.metrics.running.set(self.slots.busy)
        self.metrics.journal_syncs.set(raft.journal.syncs)
        with raft.lock:
            queue = queue_summary(raft.state, self.scheduler, now_ms())
            slots = slot_use(raft.state)
        self.metrics.set_queue(queue, slots)
        return generate_latest(self.metrics.registry)

    # -- background loops -------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Announce this incarnation and report to the leader."""
        interval = self.settings.heartbeat_interval_s
        while True:
            try:
                await self._announce_if_needed()
                await self._report_to_leader()
                self._self_fence_if_cut_off()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(interval)

    async def _announce_if_needed(self) -> None:
        raft = self._raft()
        s = self.settings
        with raft.lock:
            me = raft.state.peers.get(self.id)
            current = (
                me is not None
                and me.incarnation == self.incarnation
                and me.status == PEER_UP
                and me.slots == s.slots
                and me.labels == s.labels
                and me.http == s.http
                and me.raft == self._raft_addr
                and me.agents == self.registry.names()
                and me.role == s.role
            )
        busy = self.membership.shutting_down or self.membership.leaving
        if current or busy or raft.leader_addr is None:
            return
        cmd = commands.peer_up(
            _new_id(),
            now_ms(),
            self.id,
            self.incarnation,
            self._raft_addr,
            s.http,
            s.slots,
            dict(s.labels),
            self.registry.names(),
            s.role,
        )
        try:
            await self._propose(cmd)
        except Unavailable as exc:
            log.info("could not announce yet: %s", exc.message)

    @property
    def _raft_addr(self) -> str:
        """An executor has no Raft listener to advertise."""
        return self.settings.raft if self.settings.role == VOTER else ""

    async def _report_to_leader(self) -> None:
        raft = self._raft()
        leader_addr = raft.leader_addr
        if leader_addr is None:
            return
        if raft.is_leader:
            now = time.monotonic()
            self.liveness.heard(self.id, self.incarnation, now)
            with raft.lock:
                in_contact = self.contact.heard_majority(
                    self.liveness, raft.state.peers.values(), now
                )
            if in_contact:
                self.contact.confirmed(now)
            return
        with raft.lock:
            leader = raft.state.peer_by_raft(leader_addr)
        if leader is None or self._client is None:
            return
        report = {"id": self.id, "incarnation": self.incarnation, "running": self.slots.busy}
        try:
            async with self._client.post(
                f"http://{self.settings.dial_addr(leader.http)}/internal/v1/heartbeat",
                json=report,
                headers={"Authorization": f"Bearer {self.internal_token}"},
            ) as resp:
                await resp.read()
                if resp.status == 200:
                    self.contact.confirmed(time.monotonic())
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("heartbeat to %s failed: %s", leader.id, exc)

    def _self_fence_if_cut_off(self) -> None:
        if not self.slots.busy or not self.contact.cut_off(time.monotonic()):
            return
        log.warning("no contact with a leader: stopping %d runs (self-fencing)", self.slots.busy)
        for run_id, epoch in self.slots.running().items():
            log.info("self-fenced", extra={"run_id": run_id, "epoch": epoch})
            self.slots.stop(run_id)
            self.metrics.self_fenced.inc()

    @staticmethod
    async def _wait(event: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()
        event.clear()

    async def _leader_loop(self) -> None:
        """Scheduler and liveness, on every change and on a short tick."""
        while True:
            try:
                await self._lead_once()
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:
                log.info("leader duty deferred: %s", exc.message)
            except Exception:
                log.exception("leader duty failed")
            await self._wait(self._leader_wake, self.settings.scheduler_tick_s)

    async def _lead_once(self) -> None:
        raft = self._raft()
        leading = raft.is_leader
        now = time.monotonic()
        if leading and not self._was_leader:
            self.liveness.reset(now)
            log.info("became leader", extra={"term": raft.term})
        self._was_leader = leading
        if not leading:
            return
        self.liveness.heard(self.id, self.incarnation, now)
        with raft.lock:
            up = {p.id: p.incarnation for p in raft.state.peers.values() if p.status == PEER_UP}
        for peer_id, incarnation in self.liveness.suspects(up, now):
            log.warning("peer %s silent for %.1fs: marking it down", peer_id, self.liveness.ttl_s)
            result = await self._propose(
                commands.peer_down(_new_id(), now_ms(), peer_id, incarnation)
            )
            if result.get("ok"):
                self.metrics.peers_down.inc()
        await self._configure_if_needed()
        with raft.lock:
            plan = self.scheduler.plan(raft.state, now_ms())
        if plan:
            result = await self._propose(commands.assign(_new_id(), now_ms(), raft.term, plan))
            if result.get("rejected"):
                log.debug("assignments rejected on apply: %s", result["rejected"])
        # Last, so that an unreachable database delays only these outcomes.
        await self._settle_decided()

    async def _configure_if_needed(self) -> None:
        """Replicate this leader's caps and retry policy, so apply enforces them."""
        policy = self.settings.replicated_policy()
        with self._raft().lock:
            state = self._raft().state
            current = {
                "tenant_caps": state.tenant_caps,
                "default_tenant_cap": state.default_tenant_cap,
                "tenant_max_queued": state.tenant_max_queued,
                "default_tenant_max_queued": state.default_tenant_max_queued,
                "retry": dict(state.retry.__dict__),
            }
        if current != policy:
            result = await self._propose(commands.configure(_new_id(), now_ms(), **policy))
            log.info("scheduling policy replicated: %s", result)

    async def _settle_decided(self) -> None:
        """Write outcomes the mesh decided (cancelled while queued, dead letters)
        to storage, then let the state forget the run. Storage first: a leader
        that dies in between leaves the run settling for the next one."""
        with self._raft().lock:
            settling = [
                (_assignment(r).row(), r.outcome or "failed", r.last_error)
                for r in self._raft().state.runs.values()
                if r.status == RunStatus.SETTLING
            ]
        for row, outcome, error in settling:
            extra = {"run_id": row.id, "epoch": row.epoch}
            message = "cancelled by request" if outcome == "cancelled" else error
            await self._storage(self.store.record_runs([row]))
            await self._storage(self.store.set_terminal(row.id, outcome, message, now_ms()))
            await self._propose(commands.settle(_new_id(), now_ms(), row.id))
            log.info("run %s (decided by the mesh)", outcome, extra=extra)

    async def _reconcile_loop(self) -> None:
        """Start what the replicated state gives this peer; stop what it took away."""
        while True:
            try:
                self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile failed")
            await self._wait(self._reconcile_wake, 0.5)

    def _reconcile(self) -> None:
        raft = self._raft()
        with raft.lock:
            state = raft.state
            me = state.peers.get(self.id)
            mine = me is not None and me.incarnation == self.incarnation and me.status == PEER_UP
            owned = [_assignment(r) for r in state.owned_by(self.id)] if mine else []
            releasing = me is not None and me.drain == DRAIN_RELEASE
        wanted = {job.run_id: job.epoch for job in owned}
        for run_id, epoch in self.slots.running().items():
            if wanted.get(run_id) != epoch:
                log.info(
                    "run no longer ours: stopping it", extra={"run_id": run_id, "epoch": epoch}
                )
                self.slots.stop(run_id)
            elif releasing:
                self.slots.release(run_id)
        self._attempted &= set(wanted.items())
        if self.membership.shutting_down or self.contact.cut_off(time.monotonic()):
            return
        for job in owned:
            key = (job.run_id, job.epoch)
            if self.slots.holds(*key):
                if job.cancel_requested:
                    self._cancel_attempt(job)
                continue
            if key in self._attempted:
                if key not in self._releasing:
                    self._releasing.add(key)
                    self._detach(self._release_stopped(job))
            elif self.slots.start(job):
                self._attempted.add(key)
                log.info("starting run", extra={"run_id": job.run_id, "epoch": job.epoch})

    def _cancel_attempt(self, job: Assignment) -> None:
        ctx = self._contexts.get(job.run_id)
        if ctx is not None and ctx.epoch == job.epoch and not ctx.cancelled:
            log.info("cancelling run", extra={"run_id": job.run_id, "epoch": job.epoch})
            ctx.cancel()

    def _detach(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def _release_stopped(self, job: Assignment) -> None:
        """An attempt that stopped without an outcome (self-fenced, crashed)
        goes back to the queue for the next epoch, keeping its checkpoints."""
        extra = {"run_id": job.run_id, "epoch": job.epoch}
        log.info("releasing a stopped attempt", extra=extra)
        try:
            cmd = commands.release(_new_id(), now_ms(), job.run_id, job.epoch)
            await self._propose_while(cmd, lambda: self._still_owned(job))
        finally:
            self._releasing.discard((job.run_id, job.epoch))

    # -- running ----------------------------------------------------------

    async def _execute(self, job: Assignment, release: asyncio.Event) -> Outcome:
        s = self.settings

        def track(ctx: RunContext | None) -> None:
            if ctx is not None:
                self._contexts[job.run_id] = ctx
            elif (held := self._contexts.get(job.run_id)) is not None and held.epoch == job.epoch:
                del self._contexts[job.run_id]

        return await run_attempt(
            job,
            peer_id=self.id,
            store=self.store,
            registry=self.registry,
            clock_ms=now_ms,
            limits=Limits(max_children=s.max_children, max_depth=s.max_depth),
            mesh=self,
            default_memory_limit_mb=s.isolation_memory_mb,
            on_context=track,
            release=release,
        )

    async def _on_outcome(self, job: Assignment, outcome: Outcome) -> None:
        self.metrics.attempts.labels(outcome.status).inc()
        extra = {"run_id": job.run_id, "epoch": job.epoch}
        if outcome.status == FENCED:
            log.info("attempt fenced; a newer epoch owns the run", extra=extra)
            return
        if outcome.status == RETRY:
            log.info("attempt failed (%s): %s", outcome.kind, outcome.error, extra=extra)
            cmd = commands.fail(
                _new_id(), now_ms(), job.run_id, job.epoch, outcome.kind or "error", outcome.error
            )
        elif outcome.status == RELEASED:
            log.info("run released at a step boundary", extra=extra)
            cmd = commands.release(_new_id(), now_ms(), job.run_id, job.epoch)
        else:
            log.info("run %s", outcome.status, extra=extra)
            cmd = commands.finish(
                _new_id(), now_ms(), job.run_id, job.epoch, outcome.status, outcome.error
            )
        await self._propose_while(cmd, lambda: self._still_owned(job))

    def _still_owned(self, job: Assignment) -> bool:
        raft = self._raft()
        with raft.lock:
            run = raft.state.runs.get(job.run_id)
            return run is not None and run.owner == self.id and run.epoch == job.epoch


def _assignment(run: Run) -> Assignment:
    return Assignment(
        run_id=run.id,
        epoch=run.epoch,
        attempt=run.attempts,
        agent=run.agent,
        input=run.input,
        tenant=run.tenant,
        priority=run.priority,
        labels=dict(run.labels),
        timeout_s=run.timeout_s,
        max_attempts=run.max_attempts,
        idempotency_key=run.idempotency_key,
        parent_id=run.parent_id,
        submitted_at_ms=run.submitted_at_ms,
        depth=run.depth,
        budget=dict(run.budget) if run.budget is not None else None,
        isolation=run.isolation,
        memory_limit_mb=run.memory_limit_mb,
        cancel_requested=run.cancel_requested,
    )


def _view_from_state(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "agent": run.agent,
        # A settling run's outcome is decided; only its storage write is pending.
        "status": run.outcome if run.status == RunStatus.SETTLING and run.outcome else run.status,
        "owner": run.owner,
        "epoch": run.epoch,
        "attempts": run.attempts,
        "result": None,
        "error": run.last_error,
        "cancel_requested": run.cancel_requested,
        "retry_at": _iso_s(run.not_before_ms) if run.not_before_ms else None,
        # Counted apart: which of them use up max_attempts is the mesh's retry policy.
        "failures": {"error": run.errors, "timeout": run.timeouts, "lost_owner": run.losses},
        "session": run.session,
        "tenant": run.tenant,
        "priority": run.priority,
        "labels": dict(run.labels),
        "submitted_at": _iso_s(run.submitted_at_ms),
        "started_at": _iso_s(run.assigned_at_ms),
        "finished_at": None,
    }


def _view_from_row(row: RunRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "agent": row.agent,
        "status": row.status,
        "owner": row.owner,
        "epoch": row.epoch,
        "attempts": row.attempts,
        "result": unpack(row.result) if row.result is not None else None,
        "error": row.error,
        "tenant": row.tenant,
        "priority": row.priority,
        "labels": dict(row.labels),
        "submitted_at": _iso_s(row.submitted_at_ms),
        "started_at": _iso_s(row.started_at_ms),
        "finished_at": _iso_s(row.finished_at_ms),
    }


async def _serve(settings: Settings) -> int:
    peer = Peer(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await peer.start()
    signalled = asyncio.create_task(stop.wait())
    left = asyncio.create_task(peer.exit_requested.wait())
    await asyncio.wait({signalled, left}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("signal received: stopping gracefully")
        # A second signal while handing runs back stops at once.
        stop.clear()
        graceful = asyncio.create_task(peer.membership.shutdown())
        await asyncio.wait(
            {graceful, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
    await peer.stop()
    return 0


def run(settings: Settings) -> int:
    """Run one peer in the foreground until SIGINT or SIGTERM."""
    logs.configure(settings.id, settings.log_level)
    return uvloop.run(_serve(settings))
