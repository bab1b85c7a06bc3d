"""The peer process: wiring only.

Every peer is identical: a Raft member (or a non-voting executor), an HTTP API
and a runner. The parts are built here and meet only through the small
interfaces they declare: the proposer (commit, read the state), the service
(the API), the leader's duties, the reconciler (this peer's runs), presence
(announce, report) and membership. All of it runs on one asyncio loop; the
Raft tick thread reaches it only through RaftNode's notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from aiohttp import web

from raftmesh.consensus.model import VOTER
from raftmesh.consensus.raft import RaftNode, persisted_voters
from raftmesh.consensus.results import Result
from raftmesh.mesh import logs
from raftmesh.mesh.api import build_app
from raftmesh.mesh.credentials import cluster_secret, secure_data_dir
from raftmesh.mesh.errors import Unavailable
from raftmesh.mesh.events import EventHub
from raftmesh.mesh.leader import Leader, LeaderDuty
from raftmesh.mesh.leader_link import LeaderLink
from raftmesh.mesh.liveness import LeaderContact, Liveness
from raftmesh.mesh.membership import Membership, check_not_left, is_learner
from raftmesh.mesh.membership_api import add_membership_routes
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.observe import Observer
from raftmesh.mesh.ops_api import add_ops_routes
from raftmesh.mesh.presence import Presence
from raftmesh.mesh.proposer import Proposer, new_id, now_ms
from raftmesh.mesh.reconciler import Reconciler
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.mesh.schedules_api import ScheduleService, add_schedule_routes
from raftmesh.mesh.service import MeshService
from raftmesh.mesh.settings import Settings
from raftmesh.mesh.stalls import Stalls
from raftmesh.mesh.timed_store import TimedStore
from raftmesh.mesh.tls import server_context
from raftmesh.mesh.tracing import Tracing, traced_attempt
from raftmesh.runner.attempt import Assignment, Outcome, run_attempt
from raftmesh.runner.context import Limits, RunContext
from raftmesh.runner.rate_limits import Limiter
from raftmesh.runner.registry import build_registry
from raftmesh.storage import open_store
from raftmesh.storage.base import StorageUnavailable

log = logging.getLogger("raftmesh.peer")


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class Peer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.id = settings.id
        self.incarnation = new_id()
        secure_data_dir(settings)
        secret, self.local_secret = cluster_secret(settings)
        self._secret = secret
        self.internal_token = hmac.new(
            secret.encode(), b"raftmesh-internal-v1", hashlib.sha256
        ).hexdigest()
        self.metrics = Metrics()
        self.metrics.slots.set(settings.slots)
        self.stalls = Stalls(self.metrics.gc_pause, self.metrics.loop_lag)
        self.registry = build_registry(settings.agent_modules, demo=settings.demo_agents)
        if settings.unsafe_disable_fencing:
            log.warning("UNSAFE: fencing is disabled; stale owners can overwrite runs")
        self.store = open_store(
            settings.storage, unsafe_disable_fencing=settings.unsafe_disable_fencing
        )
        self.events = EventHub(self.store, settings.events_poll_s)
        self.observer = Observer(self.metrics)
        self.tracing = Tracing(settings.id)
        self.attempt_store = TimedStore(self.store, self.metrics, self.tracing)
        self.liveness = Liveness(settings.peer_ttl_s)
        self.contact = LeaderContact(settings.peer_ttl_s)
        self.scheduler = Scheduler(settings.placement, settings.priority_aging_s)
        self.rate_limiter = Limiter(
            settings.rate_limits,
            on_wait=lambda name, s: self.metrics.rate_limit_wait.labels(name).observe(s),
        )
        self._leader_wake = asyncio.Event()
        self._reconcile_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._http: web.AppRunner | None = None
        self.raft: RaftNode | None = None
        self.exit_requested = asyncio.Event()

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        if self.local_secret:
            log.warning(
                "no cluster secret configured: using %s (loopback only); another peer "
                "joins this one with MESH_SECRET_FILE set to that file",
                self.local_secret,
            )
        check_not_left(s.data_dir)
        # The voters this data dir last saw beat the command line, which may
        # predate joins and leaves (or, for a joined peer, name only the seed).
        partners = persisted_voters(s.data_dir) or list(s.peers)
        voter = s.role == VOTER and not is_learner(s)
        if not voter and not partners:
            raise SystemExit("an executor needs --peers: the voters' Raft addresses")
        await self._open_store()
        await self.events.start()
        self.raft = RaftNode(
            s.raft if voter else None,
            partners,
            s.data_dir,
            self._secret,
            asyncio.get_running_loop(),
            self._on_raft_change,
            commit_timeout_s=s.commit_timeout_s,
            dial=dict(s.dial),
            on_journal_sync=self.metrics.raft_journal_sync.observe,
        )
        self.proposer = Proposer(
            self.raft, s.commit_timeout_s, self._stopping, self.metrics.raft_commit_seconds.observe
        )
        self.link = LeaderLink(self.proposer, self.internal_token, s)
        self.reconciler = Reconciler(
            self.id,
            self.incarnation,
            self.proposer,
            self.contact,
            self.metrics,
            s.slots,
            self._attempt,
            lambda: self.membership.shutting_down,
        )
        self.membership = Membership(
            s, self.incarnation, self.proposer, self.reconciler.slots, self.link, self.request_exit
        )
        self.service = MeshService(
            s,
            self.incarnation,
            self.internal_token,
            self.proposer,
            self.store,
            self.events,
            self.registry,
            self.scheduler,
            self.liveness,
            self.metrics,
            lambda: self.reconciler.slots.busy,
            self._leader_wake.set,
            observer=self.observer,
            tracing=self.tracing,
        )
        leader = Leader(
            self.id,
            self.incarnation,
            self.scheduler,
            self.liveness,
            s.replicated_policy(),
            self.contact,
        )
        self.leader_duty = LeaderDuty(
            leader, self.proposer, self.store, self.metrics, wake=self._leader_wake.set
        )
        self.presence = Presence(
            s,
            self.incarnation,
            self.registry.names(),
            self.proposer,
            self.link,
            self.liveness,
            self.contact,
            lambda: self.reconciler.slots.busy,
            lambda: (
                self.membership.shutting_down or self.membership.leaving or self.membership.learning
            ),
            on_leader_clock=self.observer.own_skew,
            rate_limits=(self.rate_limiter, self.service.rate_leases),
        )
        app = build_app(self.service)
        add_membership_routes(app, self)
        add_ops_routes(app, self.service)
        add_schedule_routes(app, ScheduleService(self.proposer, self.service.check_agent))
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        host, port = _host_port(s.http)
        tls = server_context(s)
        await web.TCPSite(self._http, host, port, reuse_address=True, ssl_context=tls).start()
        self.stalls.start()
        self._background = [
            asyncio.create_task(self._every(s.heartbeat_interval_s, None, self._beat), name="beat"),
            asyncio.create_task(
                self._every(s.scheduler_tick_s, self._leader_wake, self._lead),
                name="leader",
            ),
            asyncio.create_task(
                self._every(0.5, self._reconcile_wake, self._reconcile), name="rec"
            ),
            asyncio.create_task(self.membership.promotion_loop(), name="promotion"),
        ]
        log.info(
            "peer started: raft %s, http %s, %d slots, storage %s",
            s.raft,
            s.http,
            s.slots,
            s.storage.split("@")[-1],
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
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.stalls.stop()
        if self.raft is not None:
            await self.service.close()
            await self.observer.close()
            await self.reconciler.stop()
        if self._http is not None:
            await self._http.cleanup()
        if self.raft is not None:
            await self.link.close()
            self.raft.close()
        await self.store.close()
        self.tracing.close()
        log.info("peer stopped")

    def request_exit(self) -> None:
        """Ends the process once the current request has been answered."""
        asyncio.get_running_loop().call_later(0.2, self.exit_requested.set)

    def _on_raft_change(self, cmds: list[Any], results: list[Result]) -> None:
        self.observer.applied(cmds, results)
        if self.tracing.enabled:
            with self.proposer.read() as state:
                self.tracing.assigned(cmds, results, state)
        self._leader_wake.set()
        self._reconcile_wake.set()

    # -- the loops --------------------------------------------------------

    async def _every(
        self, interval_s: float, wake: asyncio.Event | None, duty: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``duty`` every interval, and at once when ``wake`` is set; a
        failure is logged and retried on the next round, never fatal."""
        while True:
            try:
                await duty()
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:
                log.info("%s deferred: %s", getattr(duty, "__name__", "duty"), exc.message)
            except Exception:
                log.exception("%s failed", getattr(duty, "__name__", "duty"))
            if wake is None:
                await asyncio.sleep(interval_s)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await wake.wait()
            wake.clear()

    async def _lead(self) -> None:
        await self.leader_duty.run_once()
        if self.proposer.raft.is_leader:
            await self.membership.tend()

    async def _beat(self) -> None:
        """The fence check comes after the report, so that a peer whose loop
        stalled for a while reaches the leader once before it judges itself
        cut off. The unsafe debug switch turns this courtesy off with the
        storage fencing, so that the chaos checker's own test sees the stale
        writes fencing prevents."""
        await self.presence.beat()
        self.observer.tick(self.proposer.raft.leader_addr, self.store)
        if not self.settings.unsafe_disable_fencing:
            self.reconciler.self_fence_if_cut_off()
        self.reconciler.move_held_runs(time.monotonic())

    async def _reconcile(self) -> None:
        self.reconciler.reconcile()

    async def _attempt(
        self,
        job: Assignment,
        release: asyncio.Event,
        on_context: Callable[[RunContext | None], None],
    ) -> Outcome:
        return await traced_attempt(
            self.tracing, job, lambda: self._run_attempt(job, release, on_context)
        )

    async def _run_attempt(
        self,
        job: Assignment,
        release: asyncio.Event,
        on_context: Callable[[RunContext | None], None],
    ) -> Outcome:
        s = self.settings
        return await run_attempt(
            job,
            peer_id=self.id,
            store=self.attempt_store,
            registry=self.registry,
            clock_ms=now_ms,
            limits=Limits(s.max_children, s.max_depth, s.max_events_per_run),
            mesh=self.service,
            default_memory_limit_mb=s.isolation_memory_mb,
            isolation_env=s.isolation_env,
            on_context=on_context,
            release=release,
            spans=self.tracing,
            models=s.models,
            suspend_after_s=s.suspend_after_s,
            rate_limiter=self.rate_limiter,
        )


async def _serve(settings: Settings) -> int:
    peer = Peer(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await peer.start()
    # What start-up made (modules, the app, a restored state) lives as long as
    # the process: out of the collector's reach, so a full collection no longer
    # walks it: the modules alone are 57,000 objects, 7-10 ms of every full
    # collection here, and a full collection stops every thread.
    gc.freeze()
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
    return peer.membership.exit_status


def run(settings: Settings) -> int:
    """Run one peer in the foreground until SIGINT or SIGTERM."""
    logs.configure(settings.id, settings.log_level, settings.log_format)
    return uvloop.run(_serve(settings))
