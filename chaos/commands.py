"""``mesh chaos``: run the chaos harness, or judge a finished run again.

The harness is imported only when a chaos command runs: production code
(``mesh up``) must not load chaos/ (see shared STYLE, import direction).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

FAULT_KINDS = "kill,pause,partition,leader,db,restart,member"


@click.group("chaos")
def chaos() -> None:
    """Prove the invariants under faults: workload, nemesis, history, checker."""


@chaos.command("run")
@click.option("--peers", default=5, show_default=True, help="peer processes")
@click.option("--duration", default=120.0, show_default=True, help="seconds of faults and load")
@click.option(
    "--faults",
    default=FAULT_KINDS,
    show_default=True,
    help=f"comma separated, from {FAULT_KINDS}",
)
@click.option(
    "--seed", default=1, show_default=True, help="the fault schedule and workload derive from it"
)
@click.option(
    "--storage",
    default="postgresql://postgres@127.0.0.1:5432/test",
    show_default=True,
    help="PostgreSQL URL (a fresh schema is made unless ?schema= is given), sqlite:///PATH, "
    "or 'private': a PostgreSQL server of the run's own that the db fault really restarts",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="report directory")
@click.option("--slots", default=4, show_default=True, help="slots per peer")
@click.option("--clients", default=4, show_default=True, help="concurrent submitting clients")
@click.option("--rate", default=4.0, show_default=True, help="target submissions per second")
@click.option(
    "--drain", default=60.0, show_default=True, help="seconds to let runs finish after healing"
)
@click.option(
    "--failover-bound", default=10.0, show_default=True, help="invariant 7 bound, seconds"
)
@click.option("--keep-schema", is_flag=True, help="keep the PostgreSQL schema the run created")
@click.option(
    "--unsafe-disable-fencing",
    is_flag=True,
    help="UNSAFE: peers accept stale-epoch writes; only to see the checker catch them",
)
@click.option(
    "--suspend-after",
    default=1.0,
    show_default=True,
    help="peers' suspend_after_s: waits this long or longer leave their slot",
)
@click.option(
    "--secure",
    is_flag=True,
    help="peers serve https (a made-up CA) and take tokens from a tokens file; "
    "the workload uses the admin token and the CA",
)
def run_cmd(
    peers: int,
    duration: float,
    faults: str,
    seed: int,
    storage: str,
    out: Path,
    slots: int,
    clients: int,
    rate: float,
    drain: float,
    failover_bound: float,
    keep_schema: bool,
    unsafe_disable_fencing: bool,
    suspend_after: float,
    secure: bool,
) -> None:
    """Start PEERS peers, load them, inflict the seeded faults, check, report into OUT.

    Exits 1 if any invariant was violated, 2 if the run could not be set up,
    3 if a planned fault could not be inflicted.
    """
    from raftmesh.chaos.harness import ChaosConfig, ChaosError, run
    from raftmesh.chaos.workload import WorkloadSpec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = ChaosConfig(
            out=out,
            storage=storage,
            seed=seed,
            peers=peers,
            duration_s=duration,
            faults=tuple(k.strip() for k in faults.split(",") if k.strip()),
            slots=slots,
            workload=WorkloadSpec(clients=clients, rate_per_s=rate),
            drain_s=drain,
            failover_bound_s=failover_bound,
            keep_schema=keep_schema,
            unsafe_disable_fencing=unsafe_disable_fencing,
            secure=secure,
            suspend_after_s=suspend_after,
        )
        outcome = asyncio.run(run(config))
    except ChaosError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(outcome.report)
    timeline = outcome.timeline or "none (pip install 'raftmesh[chaos]' to draw it)"
    click.echo(f"report: {outcome.out / 'report.txt'}, timeline: {timeline}")
    sys.exit(outcome.exit_code)


@chaos.command("check")
@click.argument("out", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--failover-bound", default=10.0, show_default=True, help="invariant 7 bound, seconds"
)
def check_cmd(out: Path, failover_bound: float) -> None:
    """Judge a finished run's saved history, ledger and storage snapshot again."""
    from raftmesh.chaos.harness import recheck

    outcome = recheck(out, failover_bound)
    click.echo(outcome.report)
    sys.exit(outcome.exit_code)
