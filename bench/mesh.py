"""raftmesh under load: a DevMesh on its own PostgreSQL schema, clients, and the clock.

Runs are submitted over HTTP through ``MeshClient``, spread round-robin over
the peers; "end to end" is read back from storage (the first submission's
wall-clock time to the last stored ``finished_at_ms``), so it counts every
run's outcome as durably recorded, not merely acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from raftmesh.bench.env import rss_mb, schema
from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.mesh.devmesh import DevMesh


@dataclass
class BenchMesh:
    mesh: DevMesh
    clients: list[MeshClient]
    pg_url: str
    schema: str

    @property
    def table(self) -> str:
        return f'"{self.schema}".runs'

    def rss_mb(self) -> dict[str, float]:
        out = {}
        for peer in self.mesh.peers:
            if peer.running and peer.process is not None:
                rss = rss_mb(peer.process.pid)
                if rss is not None:
                    out[peer.id] = rss
        return out

    def live_clients(self) -> list[MeshClient]:
        return [c for c, p in zip(self.clients, self.mesh.peers, strict=True) if p.running]

    async def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.pg_url)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows
        finally:
            await conn.close()

    async def wait_finished(self, count: int, timeout_s: float) -> float:
        """Wait until ``count`` runs are stored as succeeded; the last one's finish (epoch s)."""
        deadline = time.monotonic() + timeout_s
        query = f"SELECT count(*), max(finished_at_ms) FROM {self.table} WHERE status = 'succeeded'"
        while True:
            done, last_ms = (await self.sql(query))[0]
            if done >= count:
                return float(last_ms) / 1000
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {count} runs finished within {timeout_s:g} s")
            await asyncio.sleep(0.05)

    async def counted(self, metric: str) -> int:
        """A counter summed over the live peers, e.g.
        ``raftmesh_peers_marked_down_total``: under a benchmark no fault is
        injected, so every peer marked down is a false suspicion."""
        total = 0.0
        for client in self.live_clients():
            for line in (await client.metrics_text()).splitlines():
                if line.startswith(f"{metric} "):
                    total += float(line.split()[1])
        return int(total)

    async def over(self, histograms: Iterable[str], seconds: float) -> dict[str, tuple[int, int]]:
        """For each histogram, of its observations on the live peers (all
        labels): how many exceeded ``seconds``, which must be one of its bucket
        bounds, and how many there were. One scrape of each peer answers all."""
        above = dict.fromkeys(histograms, 0.0)
        total = dict.fromkeys(above, 0.0)
        bounded: set[str] = set()
        for client in self.live_clients():
            for family in text_string_to_metric_families(await client.metrics_text()):
                if family.name not in above:
                    continue
                for sample in family.samples:
                    if sample.name == f"{family.name}_count":
                        total[family.name] += sample.value
                        above[family.name] += sample.value
                    elif sample.name == f"{family.name}_bucket" and (
                        float(sample.labels["le"]) == seconds
                    ):
                        above[family.name] -= sample.value
                        bounded.add(family.name)
        for name in above:
            if total[name] and name not in bounded:
                raise ValueError(f"{name} has no bucket bound at {seconds} s")
        return {name: (int(above[name]), int(total[name])) for name in above}

    async def leader(self) -> str | None:
        for client in self.live_clients():
            with contextlib.suppress(MeshHTTPError, aiohttp.ClientError, OSError, TimeoutError):
                leader = (await client.cluster())["leader"]
                if leader is not None:
                    return str(leader)
        return None


@contextlib.asynccontextmanager
async def bench_mesh(
    pg_url: str,
    *,
    peers: int = 3,
    slots: int = 4,
    env: dict[str, str] | None = None,
    workdir: Path | None = None,
) -> AsyncIterator[BenchMesh]:
    """A ready mesh of ``peers`` processes with ``slots`` each; stopped and its schema dropped after."""
    async with schema(pg_url, "raftmesh") as name:
        with tempfile.TemporaryDirectory(prefix="raftmesh-bench-", dir=workdir) as tmp:
            mesh = DevMesh(
                tmp,
                peers,
                storage=f"{pg_url}?schema={name}",
                base_port=0,
                slots=slots,
                env={"MESH_LOG_LEVEL": "warning", **(env or {})},
            )
            mesh.start()
            clients = [MeshClient(p.url, timeout_s=60) for p in mesh.peers]
            try:
                await mesh.wait_ready(90)
                yield BenchMesh(mesh, clients, pg_url, name)
            finally:
                for client in clients:
                    await client.close()
                mesh.stop(grace_s=5)


@dataclass(frozen=True)
class Submitted:
    ids: list[str]
    latencies_s: list[float]
    first_at: float  # wall clock, s
    seconds: float  # first submission to last acknowledgement
    acked_s: list[float]  # each acknowledgement, s after the first submission

    @property
    def per_s(self) -> float:
        return len(self.ids) / self.seconds if self.seconds else 0.0


async def submit_closed_loop(
    clients: list[MeshClient],
    n: int,
    in_flight: int,
    make: Callable[[int], tuple[str, Any]],
) -> Submitted:
    """``n`` submissions with ``in_flight`` outstanding at any time, round-robin over peers."""
    ids: list[str] = []
    latencies: list[float] = []
    acked: list[float] = []
    counter = iter(range(n))

    async def worker(w: int) -> None:
        client = clients[w % len(clients)]
        for i in counter:
            agent, payload = make(i)
            sent = time.monotonic()
            ids.append((await _submit(client, agent, payload))["id"])
            now = time.monotonic()
            latencies.append(now - sent)
            acked.append(now - started)

    first_at = time.time()
    started = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(min(in_flight, n))))
    return Submitted(ids, latencies, first_at, time.monotonic() - started, acked)


async def submit_open_loop(
    clients: list[MeshClient], rate_per_s: float, duration_s: float, agent: str, payload: Any
) -> tuple[list[float], int]:
    """Submissions sent on a fixed schedule whatever the answers; latency counted
    from each one's scheduled time, so a slow answer cannot hide the queue
    behind it. Returns (latencies, errors)."""
    count = int(rate_per_s * duration_s)
    latencies: list[float] = []
    errors = 0
    started = time.monotonic()

    async def one(i: int, due: float) -> None:
        nonlocal errors
        try:
            await _submit(clients[i % len(clients)], agent, payload)
        except (MeshHTTPError, aiohttp.ClientError, TimeoutError):
            errors += 1
            return
        latencies.append(time.monotonic() - due)

    # Each submission's task is made when it is due. Made all at once up
    # front, 10,000 tasks held this loop for about 100 ms, and the first
    # submissions left that late: 0.9% of them, counted as the mesh's p99.
    sending: list[asyncio.Task[None]] = []
    for i in range(count):
        due = started + i / rate_per_s
        wait_s = due - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        sending.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*sending)
    return latencies, errors


async def _submit(
    client: MeshClient, agent: str, payload: Any, give_up_s: float = 60.0
) -> dict[str, Any]:
    """One submission, waiting out backpressure (429/503 with Retry-After) as a
    client should, for at most ``give_up_s``."""
    deadline = time.monotonic() + give_up_s
    while True:
        try:
            return await client.submit(agent, payload)
        except MeshHTTPError as exc:
            if exc.status not in (429, 503) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(exc.retry_after or 0.05)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values)


async def poll(check: Callable[[], Awaitable[Any]], timeout_s: float, every_s: float = 0.02) -> Any:
    """The first truthy value of ``check``, riding out dead peers and elections."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(MeshHTTPError, aiohttp.ClientError, OSError, TimeoutError):
            value = await check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not met within {timeout_s:g} s")
        await asyncio.sleep(every_s)
