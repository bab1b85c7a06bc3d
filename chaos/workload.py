"""The workload: clients submitting through random peers, as real clients would.

Each client submits runs of the ``chaos`` agent with its own idempotency keys
through a peer picked at random, and retries a failed or timed-out attempt
(same key, another random peer) until it is acknowledged. Now and then it
submits an acknowledged key again, as a client that lost the answer would.
Every attempt is recorded with its outcome; a watcher reads the runs'
statuses and a sampler reads the cluster's load for the checker.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from raftmesh.chaos.history import (
    FAIL,
    INFO,
    OK,
    ClusterSample,
    History,
    Observation,
    PeerLoad,
    SubmitOp,
)
from raftmesh.mesh.client import TERMINAL_STATUSES, MeshClient, MeshHTTPError

TENANTS = ("alpha", "beta", "gamma")
# In-flight caps the harness gives the mesh, so invariant 6 checks them too;
# gamma is uncapped.
TENANT_CAPS = "alpha=3,beta=5"
_ATTEMPT_TIMEOUT_S = 4.0


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
        self._clients = {
            p: MeshClient(u, token, timeout_s=_ATTEMPT_TIMEOUT_S, ca=ca) for p, u in urls.items()
        }

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._clients.values()))

    async def submit_loop(self, client_no: int) -> None:
        rng = random.Random(self.seed * 1000 + client_no)
        interval = self.spec.clients / self.spec.rate_per_s
        n = 0
        while not self._stop.is_set():
            key = f"{self.tag}-c{client_no}-{n}"
            n += 1
            spec = {
                "steps": rng.randint(self.spec.min_steps, self.spec.max_steps),
                "step_s": self.spec.step_s,
            }
            tenant = rng.choice(TENANTS)
            run_id = await self._submit_until_acked(rng, key, spec, tenant)
            if run_id is not None and rng.random() < self.spec.resubmit_fraction:
                await self._attempt(rng, key, spec, tenant)
            await self._sleep(rng.uniform(0.5, 1.5) * interval)

    async def _submit_until_acked(
        self, rng: random.Random, key: str, spec: dict[str, Any], tenant: str
    ) -> str | None:
        limits: dict[str, Any] = {}
        if rng.random() < self.spec.timeout_fraction:
            limits = {
                "timeout_s": round(0.6 * spec["steps"] * spec["step_s"], 2),
                "max_attempts": 2,
            }
        # Once the workload stops, a client still owed an answer keeps trying a
        # little, so that an indeterminate attempt is settled if it can be.
        grace_until: float | None = None
        while True:
            run_id = await self._attempt(rng, key, spec, tenant, **limits)
            if run_id is not None:
                return run_id
            if self._stop.is_set():
                grace_until = grace_until or time.monotonic() + 10
                if time.monotonic() > grace_until:
                    return None
            await asyncio.sleep(rng.uniform(0.1, 0.4))

    async def _attempt(
        self, rng: random.Random, key: str, spec: dict[str, Any], tenant: str, **limits: Any
    ) -> str | None:
        peer = rng.choice(sorted(self.urls))
        start = now_ms()
        outcome, run_id, error = INFO, None, None
        try:
            answer = await self._clients[peer].submit(
                "chaos", spec, idempotency_key=key, tenant=tenant, **limits
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
                self.history.samples.append(_sample(peer, cluster))
            await self._sleep(period_s)

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            return


def _sample(source: str, cluster: dict[str, Any]) -> ClusterSample:
    peers = tuple(
        PeerLoad(str(p["id"]), int(p["slots"]), int(p["running"]), str(p["status"]))
        for p in cluster.get("peers", [])
    )
    per_tenant = (cluster.get("queue") or {}).get("tenants") or {}
    tenants = {
        str(name): (int(t["running"]), int(t["cap"]))
        for name, t in per_tenant.items()
        if isinstance(t, dict) and t.get("cap") is not None
    }
    return ClusterSample(now_ms(), source, cluster.get("leader"), peers, tenants)
