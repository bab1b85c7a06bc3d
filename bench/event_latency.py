"""Live-event latency through a peer that does not own the run.

    python -m raftmesh.bench.event_latency [--storage sqlite|postgres|both] [--events 60]

A ``durable`` run emits one event per step (every 50 ms) on its owner; a
watcher follows it over SSE from another peer. Latency is the time from the
event's storage timestamp to its arrival at the watcher (one host, one clock).
On PostgreSQL the watcher's peer is woken by LISTEN/NOTIFY; on SQLite it polls
every 0.2 s. Measured, not asserted: prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid

import asyncpg
from rich.console import Console
from rich.table import Table

from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
console = Console()


async def measure(storage: str, events: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="raftmesh-bench-") as tmp:
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        if storage == "postgres":
            url = f"{PG_URL}?schema={schema}"
        else:
            url = f"sqlite:///{tmp}/mesh.db"
        mesh = DevMesh(tmp, 3, storage=url, base_port=0, env={"MESH_LOG_LEVEL": "warning"})
        mesh.start()
        try:
            await mesh.wait_ready(60)
            clients = {p.id: MeshClient(p.url) for p in mesh.peers}
            spec = {"steps": events, "step_seconds": 0.05, "sleep_after": 0, "sleep_seconds": 1.5}
            run_id = (await clients["peer-1"].submit("durable", spec))["id"]
            owner = None
            while owner is None:
                run = await clients["peer-1"].get_run(run_id)
                owner = run["owner"] if run["status"] == "running" else None
                await asyncio.sleep(0.02)
            watcher = next(c for p, c in clients.items() if p != owner)
            latencies = []
            async for msg in watcher.events(run_id):
                if msg.event == "end":
                    break
                latencies.append(time.time() - msg.data["at"])
            for client in clients.values():
                await client.close()
            return latencies
        finally:
            mesh.stop()
            if storage == "postgres":
                conn = await asyncpg.connect(PG_URL)
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--events", type=int, default=60)
    args = parser.parse_args()
    backends = ["postgres", "sqlite"] if args.storage == "both" else [args.storage]
    table = Table(title="event latency: stored -> received by a non-owner watcher (ms)")
    for column in ("storage", "events", "median", "p95", "max"):
        table.add_column(column, justify="right")
    for backend in backends:
        got = sorted(await measure(backend, args.events))
        ms = [x * 1000 for x in got]
        p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
        table.add_row(
            backend, str(len(ms)), f"{statistics.median(ms):.1f}", f"{p95:.1f}", f"{ms[-1]:.1f}"
        )
    console.print(table)


if __name__ == "__main__":
    asyncio.run(main())
