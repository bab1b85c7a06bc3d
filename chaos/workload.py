"""The workload: clients submitting through random peers, as real clients would.

Each client submits runs with its own idempotency keys through a peer picked
at random, and retries a failed or timed-out attempt (same key, another random
peer) until it is acknowledged. Now and then it submits an acknowledged key
again, as a client that lost the answer would. Most runs are of the ``chaos``
agent; the others wait (chaos.agents): sleepers, parents awaiting children,
and runs waiting for signals, which a signaller sends them one by one, each
with its own idempotency key, retried with that key until a peer acknowledges
it (and now and then sent again on purpose). One schedule ticks through the
whole run, and an operator pauses and resumes runs now and then. Every
attempt is recorded with its outcome; a watcher reads the
runs' statuses and a sampler reads the cluster's load and its waiting and
paused runs for the checker.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from raftmesh.chaos.history import (
    FAIL,
    INFO,
    OK,
    SIGNAL_NAME,
    ClusterSample,
    History,
    Observation,
    ParkedRun,
    PauseOp,
    PeerLoad,
    ScheduleRecord,
    SignalOp,
    SubmitOp,
)
from raftmesh.mesh.client import TERMINAL_STATUSES, MeshClient, MeshHTTPError

TENANTS = ("alpha", "beta", "gamma")
# In-flight caps the harness gives the mesh, so invariant 6 checks them too;
# gamma is uncapped.
TENANT_CAPS = "alpha=3,beta=5"
_ATTEMPT_TIMEOUT_S = 4.0
CHAOS, SLEEP, SIGNAL, PARENT = "chaos", "chaos_sleep", "chaos_signal", "chaos_parent"
# The schedule's runs: short, and of the uncapped tenant, so that no cap or
# overlap rule may drop a tick (its catch-up policy is "all": every tick owed).
SCHEDULE_TENANT = "gamma"
SCHEDULE_INPUT = {"steps": 2, "step_s": 0.2}
# A 404 may come from a peer whose storage lags (it should not): tried again
# this often before the signaller gives up on the run.
_SIGNAL_NOT_FOUND_TRIES = 10


def now_ms() -> int:
    return int(time.time() * 1000)


def canonical(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class WorkloadSpec:
    clients: int = 4
    rate_per_s: float = 4.0
    min_steps: int = 3
    max_steps: int = 10
    step_s: float = 0.4
    resubmit_fraction: float = 0.1
    # Runs whose first attempt times out part-way (a timeout of 60% of their
    # work, two attempts): the retry must continue from the checkpoint while
    # the timed-out attempt stays stopped.
    timeout_fraction: float = 0.1
    # Runs that wait (the rest are plain ``chaos`` runs). A sleeper's sleep
    # outlasts the peers' suspend_after_s, so it suspends.
    sleep_fraction: float = 0.12
    signal_fraction: float = 0.12
    parent_fraction: float = 0.08
    sleep_s: tuple[float, float] = (1.5, 4.0)
    signals_per_run: int = 3
    # Seconds between the signals to one run (the first comes this long after
    # the run is acknowledged), so runs often suspend before each one.
    signal_gap_s: tuple[float, float] = (0.3, 3.0)
    duplicate_signal_fraction: float = 0.15
    children: tuple[int, int] = (2, 3)
    # The schedule's period; 0: no schedule.
    schedule_every_s: float = 2.0
    # An operator pauses a random unfinished run this often (0: never) and
    # resumes it after ``pause_hold_s``.
    pause_every_s: float = 3.0
    pause_hold_s: tuple[float, float] = (0.5, 3.0)


class Workload:
    def __init__(
        self,
        urls: dict[str, str],
        spec: WorkloadSpec,
        seed: int,
        tag: str,
        history: History,
        token: str | None = None,
        ca: str | None = None,
    ) -> None:
        """``token`` may submit for every tenant the workload uses (an admin
        token); ``ca`` checks https peers."""
        self.urls = urls
        self.spec = spec
        self.seed = seed
        self.tag = tag
        self.history = history
        self.acked: dict[str, str] = {}  # key -> run id
        self.terminal: set[str] = set()
        self._last_status: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._token, self._ca = token, ca
        self._clients = {
            p: MeshClient(u, token, timeout_s=_ATTEMPT_TIMEOUT_S, ca=ca) for p, u in urls.items()
        }
        self._signallers: dict[str, asyncio.Task[None]] = {}
        self._paused: set[str] = set()  # runs the pause loop tried to pause
        self._resume_rng = random.Random(seed * 1000 + 994)

    def replace_peer(self, left: str, joined: str, url: str) -> None:
        """Send to the peer that joined instead of the one that left: over a
        long soak every first peer may have been replaced, and a workload
        still sending to them alone would see the mesh as down for good."""
        self.urls = {p: u for p, u in self.urls.items() if p != left} | {joined: url}
        self._clients[joined] = MeshClient(
            url, self._token, timeout_s=_ATTEMPT_TIMEOUT_S, ca=self._ca
        )

    def stop(self) -> None:
        """Clients stop submitting; signallers send what they still owe at once."""
        self._stop.set()

    async def close(self) -> None:
        await self.stop_signallers()
        await asyncio.gather(*(c.close() for c in self._clients.values()))

    async def stop_signallers(self) -> None:
        """Cancel the signallers still trying (the drain is over)."""
        tasks = list(self._signallers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def submit_loop(self, client_no: int) -> None:
        rng = random.Random(self.seed * 1000 + client_no)
        interval = self.spec.clients / self.spec.rate_per_s
        n = 0
        while not self._stop.is_set():
            key = f"{self.tag}-c{client_no}-{n}"
            n += 1
            agent, spec = self._pick_run(rng)
            tenant = rng.choice(TENANTS)
            run_id = await self._submit_until_acked(rng, key, agent, spec, tenant)
            if run_id is not None and agent == SIGNAL and run_id not in self._signallers:
                self._signallers[run_id] = asyncio.create_task(
                    self._signal_run(run_id, int(spec["signals"]))
                )
            if run_id is not None and rng.random() < self.spec.resubmit_fraction:
                await self._attempt(rng, key, agent, spec, tenant)
            await self._sleep(rng.uniform(0.5, 1.5) * interval)

    def _pick_run(self, rng: random.Random) -> tuple[str, dict[str, Any]]:
        steps = rng.randint(self.spec.min_steps, self.spec.max_steps)
        pick = rng.random()
        sleeps = self.spec.sleep_fraction
        signals = sleeps + self.spec.signal_fraction
        parents = signals + self.spec.parent_fraction
        if pick < sleeps:
            return SLEEP, {
                "steps": min(steps, 4),
                "step_s": self.spec.step_s,
                "sleep_s": round(rng.uniform(*self.spec.sleep_s), 2),
                "sleep_at": 1,
            }
        if pick < signals:
            return SIGNAL, {"signals": self.spec.signals_per_run}
        if pick < parents:
            return PARENT, {
                "children": rng.randint(*self.spec.children),
                "child": {"steps": 2, "step_s": self.spec.step_s},
                "step_s": self.spec.step_s,
            }
        return CHAOS, {"steps": steps, "step_s": self.spec.step_s}

    async def _submit_until_acked(
        self, rng: random.Random, key: str, agent: str, spec: dict[str, Any], tenant: str
    ) -> str | None:
        limits: dict[str, Any] = {}
        # Only plain runs get a timeout: a waiting run's clock runs on while it
        # waits, so its attempt could time out for want of a signal.
        if agent == CHAOS and rng.random() < self.spec.timeout_fraction:
            limits = {
                "timeout_s": round(0.6 * spec["steps"] * spec["step_s"], 2),
                "max_attempts": 2,
            }
        # Once the workload stops, a client still owed an answer keeps trying a
        # little, so that an indeterminate attempt is settled if it can be.
        grace_until: float | None = None
        while True:
            run_id = await self._attempt(rng, key, agent, spec, tenant, **limits)
            if run_id is not None:
                return run_id
            if self._stop.is_set():
                grace_until = grace_until or time.monotonic() + 10
                if time.monotonic() > grace_until:
                    return None
            await asyncio.sleep(rng.uniform(0.1, 0.4))

    async def _attempt(
        self,
        rng: random.Random,
        key: str,
        agent: str,
        spec: dict[str, Any],
        tenant: str,
        **limits: Any,
    ) -> str | None:
        peer = rng.choice(sorted(self.urls))
        start = now_ms()
        outcome, run_id, error = INFO, None, None
        try:
            answer = await self._clients[peer].submit(
                agent, spec, idempotency_key=key, tenant=tenant, **limits
            )
            outcome, run_id = OK, str(answer["id"])
        except MeshHTTPError as exc:
            outcome = INFO if exc.status >= 500 else FAIL
            error = f"{exc.status} {exc.code}"
        except aiohttp.ClientConnectorError as exc:
            outcome, error = FAIL, f"connect: {exc.os_error}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.history.submits.append(SubmitOp(key, peer, start, now_ms(), outcome, run_id, error))
        if run_id is not None:
            self.acked.setdefault(key, run_id)
        return run_id

    # -- signals ------------------------------------------------------------

    async def _signal_run(self, run_id: str, count: int) -> None:
        """Send the run its ``count`` signals in order, each acknowledged
        before the next is sent; some are sent a second time with their key."""
        rng = random.Random(f"{self.seed}/{run_id}")
        await self._sleep(rng.uniform(*self.spec.signal_gap_s))
        for index in range(count):
            key = f"{run_id}/{SIGNAL_NAME}/{index}"
            data = {"index": index, "key": key}
            if not await self._signal_until_acked(rng, run_id, key, data, deliberate=False):
                return
            if rng.random() < self.spec.duplicate_signal_fraction:
                await self._signal_until_acked(rng, run_id, key, data, deliberate=True)
            await self._sleep(rng.uniform(*self.spec.signal_gap_s))

    async def _signal_until_acked(
        self, rng: random.Random, run_id: str, key: str, data: dict[str, Any], deliberate: bool
    ) -> bool:
        """Retried with the same key through random peers until acknowledged;
        False if the mesh refused it for good (the run ended, or is unknown)."""
        not_found = 0
        while True:
            outcome, status = await self._signal_attempt(rng, run_id, key, data, deliberate)
            if outcome == OK:
                return True
            if status == 404:
                not_found += 1
            if status == 409 or not_found >= _SIGNAL_NOT_FOUND_TRIES:
                return False
            if status is not None and 400 <= status < 500 and status not in (404, 429):
                return False
            await asyncio.sleep(rng.uniform(0.1, 0.4))

    async def _signal_attempt(
        self, rng: random.Random, run_id: str, key: str, data: dict[str, Any], deliberate: bool
    ) -> tuple[str, int | None]:
        """The attempt's outcome and the HTTP status of a refusal."""
        peer = rng.choice(sorted(self.urls))
        start = now_ms()
        outcome, seq, duplicate, error, status = INFO, None, None, None, None
        try:
            answer = await self._clients[peer].signal(run_id, SIGNAL_NAME, data, key)
            outcome, seq, duplicate = OK, int(answer["seq"]), bool(answer["duplicate"])
        except MeshHTTPError as exc:
            status = exc.status
            outcome = INFO if exc.status >= 500 or exc.status == 429 else FAIL
            error = f"{exc.status} {exc.code}"
        except aiohttp.ClientConnectorError as exc:
            outcome, error = FAIL, f"connect: {exc.os_error}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.history.signals.append(
            SignalOp(
                run_id,
                SIGNAL_NAME,
                key,
                str(canonical(data)),
                peer,
                start,
                now_ms(),
                outcome,
                seq,
                duplicate,
                deliberate,
                error,
            )
        )
        return outcome, status

    # -- pauses -------------------------------------------------------------

    async def pause_loop(self) -> None:
        """Pause a random unfinished run now and then, and resume it a little
        later (retried, like an operator would, until a peer answers)."""
        if not self.spec.pause_every_s:
            return
        rng = random.Random(self.seed * 1000 + 995)
        while not self._stop.is_set():
            await self._sleep(rng.uniform(0.5, 1.5) * self.spec.pause_every_s)
            pending = sorted(r for r in set(self.acked.values()) if r not in self.terminal)
            if not pending or self._stop.is_set():
                continue
            run_id = rng.choice(pending)
            self._paused.add(run_id)
            await self._pause_attempt(rng, run_id, "pause")
            await self._sleep(rng.uniform(*self.spec.pause_hold_s))
            await self._resume_until_answered(rng, run_id)

    async def resume_paused(self) -> None:
        """Resume every run this workload paused that a peer lists as paused
        (a pause whose answer was lost may have paused it after its resume)."""
        rng = self._resume_rng
        for peer in rng.sample(sorted(self.urls), len(self.urls)):
            try:
                page = await self._clients[peer].list_runs(status="paused", limit=10_000)
            except (MeshHTTPError, aiohttp.ClientError, TimeoutError, OSError):
                continue
            for run in page.get("runs", []):
                if str(run["id"]) in self._paused:
                    await self._resume_until_answered(rng, str(run["id"]))
            return

    async def _resume_until_answered(
        self, rng: random.Random, run_id: str, timeout_s: float = 30.0
    ) -> None:
        """Through random peers until one answers: 2xx, or a refusal (409: the
        run is not paused or has ended; 404)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self._pause_attempt(rng, run_id, "resume"):
                return
            await asyncio.sleep(rng.uniform(0.1, 0.4))

    async def _pause_attempt(self, rng: random.Random, run_id: str, action: str) -> bool:
        """One attempt; whether a peer answered it (2xx, or a 4xx refusal)."""
        peer = rng.choice(sorted(self.urls))
        client = self._clients[peer]
        start = now_ms()
        outcome, status, error, answered = INFO, None, None, False
        try:
            view = await (client.pause(run_id) if action == "pause" else client.resume(run_id))
            outcome, status, answered = OK, str(view.get("status")), True
        except MeshHTTPError as exc:
            outcome = INFO if exc.status >= 500 else FAIL
            error, answered = f"{exc.status} {exc.code}", exc.status < 500
        except aiohttp.ClientConnectorError as exc:
            outcome, error = FAIL, f"connect: {exc.os_error}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.history.pauses.append(
            PauseOp(run_id, action, peer, start, now_ms(), outcome, status, error)
        )
        return answered

    # -- the schedule -------------------------------------------------------

    async def create_schedule(self, timeout_s: float = 60.0) -> None:
        """The run's one schedule, retried (same id and definition, so a lost
        answer is harmless) until a peer answers with it."""
        if not self.spec.schedule_every_s:
            return
        rng = random.Random(self.seed * 1000 + 997)
        schedule_id = f"{self.tag}-ticks"
        deadline = time.monotonic() + timeout_s
        while True:
            client = self._clients[rng.choice(sorted(self.urls))]
            try:
                view = await client.add_schedule(
                    schedule_id,
                    CHAOS,
                    SCHEDULE_INPUT,
                    every_s=self.spec.schedule_every_s,
                    tenant=SCHEDULE_TENANT,
                    overlap="allow",
                    catchup="all",
                )
                break
            except (MeshHTTPError, aiohttp.ClientError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        self.history.schedules.append(
            ScheduleRecord(
                id=schedule_id,
                every_ms=round(float(view["every_s"]) * 1000),
                catchup=str(view["catchup"]),
                overlap=str(view["overlap"]),
                tenant=str(view["tenant"]),
                created_ms=round(float(view["created_at"]) * 1000),
            )
        )

    async def delete_schedules(self, timeout_s: float = 30.0) -> None:
        """Delete the schedules at the end of the load; the ticks owed are
        those before the first attempt began."""
        rng = random.Random(self.seed * 1000 + 996)
        for i, record in enumerate(self.history.schedules):
            started = now_ms()
            deadline = time.monotonic() + timeout_s
            view: dict[str, Any] | None = None
            while time.monotonic() < deadline:
                client = self._clients[rng.choice(sorted(self.urls))]
                try:
                    view = await client.delete_schedule(record.id)
                    break
                except MeshHTTPError as exc:
                    if exc.status == 404:  # an earlier attempt deleted it
                        break
                except (aiohttp.ClientError, TimeoutError, OSError):
                    pass
                await asyncio.sleep(0.5)
            self.history.schedules[i] = replace(
                record,
                deleted_ms=started,
                fired=None if view is None else int(view["fired"]),
                skipped=None if view is None else int(view["skipped"]),
            )

    async def watch_loop(self, period_s: float = 1.0) -> None:
        """Read every acknowledged, unfinished run through a random peer."""
        rng = random.Random(self.seed * 1000 + 999)
        while not self._stop.is_set():
            await self.observe_pending(rng)
            await self._sleep(period_s)

    async def observe_pending(self, rng: random.Random) -> int:
        pending = [r for r in set(self.acked.values()) if r not in self.terminal]
        sem = asyncio.Semaphore(16)

        async def one(run_id: str) -> None:
            async with sem:
                await self.observe(run_id, rng.choice(sorted(self.urls)))

        await asyncio.gather(*(one(r) for r in pending))
        return len([r for r in set(self.acked.values()) if r not in self.terminal])

    async def observe(self, run_id: str, peer: str) -> None:
        try:
            run = await self._clients[peer].get_run(run_id)
        except (MeshHTTPError, aiohttp.ClientError, TimeoutError, OSError):
            return
        status = str(run["status"])
        if status in TERMINAL_STATUSES:
            self.terminal.add(run_id)
        if status != self._last_status.get(run_id) or status in TERMINAL_STATUSES:
            self._last_status[run_id] = status
            self.history.observations.append(
                Observation(run_id, now_ms(), status, canonical(run.get("result")), f"api:{peer}")
            )

    async def sample_loop(self, period_s: float = 0.5) -> None:
        rng = random.Random(self.seed * 1000 + 998)
        while not self._stop.is_set():
            peer = rng.choice(sorted(self.urls))
            try:
                cluster = await self._clients[peer].cluster()
            except (MeshHTTPError, aiohttp.ClientError, TimeoutError, OSError):
                cluster = None
            if cluster is not None:
                parked = await self._parked(peer)
                self.history.samples.append(_sample(peer, cluster, parked))
            await self._sleep(period_s)

    async def _parked(self, peer: str) -> tuple[ParkedRun, ...] | None:
        """The waiting and paused runs of the peer's committed state, with
        their owners (invariant 10); None if it did not answer."""
        parked: list[ParkedRun] = []
        try:
            for status in ("waiting", "paused"):
                page = await self._clients[peer].list_runs(status=status, limit=10_000)
                parked += [
                    ParkedRun(str(r["id"]), str(r["status"]), r.get("owner"))
                    for r in page.get("runs", [])
                ]
        except (MeshHTTPError, aiohttp.ClientError, TimeoutError, OSError):
            return None
        return tuple(parked)

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            return


def _sample(
    source: str, cluster: dict[str, Any], parked: tuple[ParkedRun, ...] | None
) -> ClusterSample:
    peers = tuple(
        PeerLoad(
            str(p["id"]),
            int(p["slots"]),
            int(p["running"]),
            str(p["status"]),
            int(p.get("capacity", p["slots"])),
        )
        for p in cluster.get("peers", [])
    )
    per_tenant = (cluster.get("queue") or {}).get("tenants") or {}
    tenants = {
        str(name): (int(t["running"]), int(t["cap"]))
        for name, t in per_tenant.items()
        if isinstance(t, dict) and t.get("cap") is not None
    }
    runs = {str(k): int(v) for k, v in (cluster.get("runs") or {}).items()}
    return ClusterSample(now_ms(), source, cluster.get("leader"), peers, tenants, runs, parked)
