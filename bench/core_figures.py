"""Core-path figures on a local 3-peer mesh: submissions/s, election and failover time.

    python -m raftmesh.bench.core_figures [--storage sqlite|postgres] [--submissions 2000] [--concurrency 64]

Measured, not asserted: prints a table. Failover is measured from the kill to
(a) the new owner's claim and (b) the first step checkpointed by the new owner.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid

import aiohttp
from rich.console import Console
from rich.table import Table

from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.mesh.devmesh import DevMesh
from raftmesh.storage import open_store

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
console = Console()


async def wait_for(check, timeout_s: float, poll_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = await check()
            if value:
                return value
        except (MeshHTTPError, aiohttp.ClientError, OSError, TimeoutError):
            pass  # a dead peer or an election in progress: poll on
        await asyncio.sleep(poll_s)
    raise TimeoutError("condition not met")


async def throughput(
    clients: list[MeshClient], total: int, concurrency: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker(i: int) -> None:
        client = clients[i % len(clients)]
        for _ in counter:
            t = time.monotonic()
            await client.submit("echo", {"n": 1})
            latencies.append(time.monotonic() - t)

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return total / (time.monotonic() - started), latencies


async def _leader(client: MeshClient) -> str | None:
    return (await client.cluster())["leader"]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--submissions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--elections", type=int, default=5)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="raftmesh-bench-")
    storage = (
        f"{PG_URL}?schema=bench_{uuid.uuid4().hex[:8]}" if args.storage == "postgres" else None
    )
    mesh = DevMesh(workdir, 3, storage=storage)
    mesh.start()
    rows: list[tuple[str, str]] = []
    try:
        await mesh.wait_ready(60)
        clients = [MeshClient(p.url, timeout_s=30) for p in mesh.peers]
        store = open_store(mesh.storage)
        await store.open()
        await throughput(clients, 200, 16)  # warm-up
        rate, lat = await throughput(clients, args.submissions, args.concurrency)
        lat.sort()
        rows.append(
            (
                "acknowledged submissions/s",
                f"{rate:,.0f} ({args.submissions} runs, {args.concurrency} in flight, all 3 peers)",
            )
        )
        rows.append(
            (
                "submit latency p50 / p99",
                f"{statistics.median(lat) * 1000:.1f} ms / {lat[int(len(lat) * 0.99)] * 1000:.1f} ms",
            )
        )
        single = []
        for _ in range(100):
            t = time.monotonic()
            await clients[0].submit("echo", 1)
            single.append(time.monotonic() - t)
        rows.append(("one-at-a-time submit p50", f"{statistics.median(single) * 1000:.1f} ms"))

        # Failover: steps runs everywhere, kill -9 the busiest non-leader owner.
        leader = (await clients[0].cluster())["leader"]
        ids = [
            (await clients[i % 3].submit("steps", {"steps": 20, "step_seconds": 0.2}))["id"]
            for i in range(9)
        ]

        async def busy_owner():
            runs = [await clients[0].get_run(i) for i in ids]
            owners = [r["owner"] for r in runs if r["status"] == "running" and r["owner"] != leader]
            return max(set(owners), key=owners.count) if owners else None

        victim = await wait_for(busy_owner, 30)
        await asyncio.sleep(1.0)
        victim_runs = [i for i in ids if (await clients[0].get_run(i))["owner"] == victim]
        killed_ms = time.time() * 1000
        mesh.kill(victim)
        live = [c for c, p in zip(clients, mesh.peers, strict=True) if p.id != victim]
        for i in victim_runs:
            await live[0].wait(i, 120)
        claims, first_steps = [], []
        for i in victim_runs:
            row = await store.get_run(i)
            assert row is not None and row.started_at_ms is not None, f"run {i} was not stored"
            claims.append(row.started_at_ms - killed_ms)
            new_steps = [s for s in await store.load_steps(i) if s.epoch == row.epoch]
            first_steps.append(min(s.at_ms for s in new_steps) - killed_ms - 200)
        rows.append(
            (
                "failover: kill → new owner's claim",
                f"p50 {statistics.median(claims):.0f} ms, max {max(claims):.0f} ms ({len(claims)} runs)",
            )
        )
        rows.append(
            (
                "failover: kill → next step starts on new owner",
                f"p50 {statistics.median(first_steps):.0f} ms, max {max(first_steps):.0f} ms",
            )
        )

        # Leader election: with all three peers up, kill -9 the leader, time
        # until a survivor names a new one, bring the old leader back; repeat.
        mesh.restart(victim)
        await mesh.wait_ready(60, [victim])
        elections = []
        for _ in range(args.elections):
            leader = await wait_for(lambda: _leader(clients[0]), 20)
            probe = next(c for c, p in zip(clients, mesh.peers, strict=True) if p.id != leader)
            killed = time.monotonic()
            mesh.kill(leader)

            async def new_leader(probe=probe, old=leader):
                found = await _leader(probe)
                return found if found != old else None

            await wait_for(new_leader, 20)
            elections.append((time.monotonic() - killed) * 1000)
            mesh.restart(leader)
            await mesh.wait_ready(60, [leader])
        rows.append(
            (
                "leader election after kill -9 of the leader",
                f"p50 {statistics.median(elections):.0f} ms, max {max(elections):.0f} ms ({len(elections)} kills)",
            )
        )
        await store.close()
        for c in clients:
            await c.close()
    except MeshHTTPError as exc:
        console.print(f"[red]mesh error: {exc}")
        raise
    finally:
        mesh.stop()
    table = Table(title=f"raftmesh core figures ({args.storage}, 3 peers, 2 cores)")
    table.add_column("figure")
    table.add_column("value")
    for figure in rows:
        table.add_row(*figure)
    console.print(table)


if __name__ == "__main__":
    asyncio.run(main())
