"""``mesh bench SCENARIO...``: run scenarios alone or all together, print, save, plot.

Loaded by the CLI only when ``mesh bench`` runs (the bench package sits above
the CLI in the import layers, and ``mesh up`` must not load it).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import click
from rich.console import Console

from raftmesh.bench.env import DEFAULT_PG_URL, DEFAULT_REDIS, BenchSetupError
from raftmesh.bench.extra import ExtraMissing, missing
from raftmesh.bench.peers import NEEDS
from raftmesh.bench.report import emit
from raftmesh.bench.scenarios import SCENARIOS, Params
from raftmesh.mesh.client import MeshHTTPError
from raftmesh.mesh.devmesh import DevMeshError

SYSTEMS = ("raftmesh", "celery", "procrastinate", "dbos")
# The comparison systems each scenario runs, when asked to.
USES = {"short-runs": ("celery", "procrastinate", "dbos"), "steps": ("dbos",)}


@click.command("bench")
@click.argument("scenarios", nargs=-1, required=True, type=click.Choice([*SCENARIOS, "all"]))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="directory for <scenario>.json and <scenario>.png",
)
@click.option(
    "--postgres",
    "pg_url",
    default=lambda: os.environ.get("RAFTMESH_BENCH_POSTGRES_URL", DEFAULT_PG_URL),
    show_default=DEFAULT_PG_URL,
    help="PostgreSQL every system stores into (a schema each, dropped afterwards); "
    "env RAFTMESH_BENCH_POSTGRES_URL",
)
@click.option(
    "--smoke", is_flag=True, help="seconds-long sizes: to see that it works, not to measure"
)
@click.option(
    "--scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="multiply every scenario's size (runs, durations) by this",
)
@click.option(
    "--n", type=click.IntRange(min=1), help="the scenario's main count, instead of its size"
)
@click.option(
    "--systems",
    default=",".join(SYSTEMS),
    show_default=True,
    help="comma separated, which systems short-runs and steps compare",
)
@click.option(
    "--redis",
    default=DEFAULT_REDIS,
    show_default=True,
    help="HOST:PORT of the Redis Celery uses; when none answers there, "
    "a redis-server of the run's own is started (and installed with apt-get if missing)",
)
def bench(
    scenarios: tuple[str, ...],
    out: Path,
    pg_url: str,
    smoke: bool,
    scale: float,
    n: int | None,
    systems: str,
    redis: str,
) -> None:
    """Measure raftmesh beside its targets and its peers: acceptance, short-runs,
    steps, many-agents, failover, footprint (or all). Measures, never asserts."""
    chosen = list(SCENARIOS) if "all" in scenarios else list(dict.fromkeys(scenarios))
    wanted = tuple(s.strip() for s in systems.split(",") if s.strip())
    unknown = sorted(set(wanted) - set(SYSTEMS))
    if unknown:
        raise click.BadParameter(
            f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}",
            param_hint="--systems",
        )
    needed = {s for name in chosen for s in USES.get(name, ()) if s in wanted}
    absent = sorted({pkg for s in needed for pkg in missing(NEEDS[s])})
    if absent:
        raise ExtraMissing(absent, ", or leave those systems out with --systems raftmesh")
    # A table piped into a file or a CI log keeps its columns readable.
    console = Console() if Console().is_terminal else Console(width=150)
    with tempfile.TemporaryDirectory(prefix="raftmesh-bench-") as tmp:
        params = Params(
            pg_url, Path(tmp), smoke=smoke, scale=scale, n=n, systems=wanted, redis=redis
        )
        for name in chosen:
            console.rule(f"[bold]{name}")
            try:
                result = asyncio.run(SCENARIOS[name](params))
            except (BenchSetupError, DevMeshError, MeshHTTPError, TimeoutError) as exc:
                raise click.ClickException(f"{name}: {exc}") from exc
            emit(result, out, console)
