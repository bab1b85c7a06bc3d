"""The ``mesh`` command.

Only ``up`` runs a peer in this process; every other command is a client of
the HTTP API (``mesh.client``) or of local peer processes (``mesh.devmesh``),
so the CLI sees the mesh exactly as any other client does.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import signal
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import click
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from raftmesh.cli import membership, run_control
from raftmesh.cli.doctor import doctor
from raftmesh.cli.peer_options import peer_settings_options
from raftmesh.cli.remote import DEFAULT_PEER_URL, call, peer_option, token_option
from raftmesh.cli.schedule import schedule
from raftmesh.cli.top import top
from raftmesh.cli.watch import agents, follow_run, print_end, watch
from raftmesh.mesh.client import TERMINAL_STATUSES, MeshClient, MeshHTTPError
from raftmesh.mesh.devmesh import DEFAULT_BASE_PORT, HTTP_PORT_OFFSET, DevMesh, DevMeshError
from raftmesh.mesh.settings import Settings, SettingsError


class ConfigError(click.ClickException):
    """A configuration the peer cannot start with: usage-error exit status, one line."""

    exit_code = 2


class _MeshGroup(click.Group):
    """Loads ``mesh chaos`` and ``mesh bench`` only when they are asked for:
    both harnesses sit above the CLI in the import layers, and ``mesh up``
    must not load them."""

    _lazy = {"chaos": "raftmesh.chaos.commands", "bench": "raftmesh.bench.commands"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._lazy:
            command: click.Command = getattr(importlib.import_module(self._lazy[name]), name)
            return command
        return super().get_command(ctx, name)


@click.group(cls=_MeshGroup)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False),
    envvar="MESH_CA",
    help="PEM CA that an https peer's certificate is checked against (env MESH_CA).",
)
def main(ca: str | None) -> None:
    """raftmesh: a peer-to-peer mesh that runs long-lived agent runs."""


for _command in membership.COMMANDS:
    main.add_command(_command)
main.add_command(top)


@main.command()
@click.option("--id", help="This peer's id (env MESH_ID).")
@click.option("--raft", help="Raft bind address HOST:PORT (env MESH_RAFT).")
@click.option("--http", help="HTTP API bind address HOST:PORT (env MESH_HTTP).")
@click.option("--peers", help="The other peers' Raft addresses, comma separated (env MESH_PEERS).")
@peer_settings_options
@click.option(
    "--role",
    type=click.Choice(["voter", "executor"]),
    help="voter (Raft member) or executor (runs work, no vote; --peers are the voters).",
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    envvar="MESH_CONFIG",
    help="TOML file with any settings; flags and env override it (env MESH_CONFIG).",
)
def up(config: str | None, **flags: Any) -> None:
    """Run one peer in the foreground until SIGINT/SIGTERM."""
    try:
        settings = Settings.load(flags, config)
        # Checked here too so a missing secret is a usage error before anything
        # starts; the peer itself makes up a secret of its own on loopback.
        settings.check_secret()
        settings.check_auth()
    except (SettingsError, OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(exc)) from exc
    # Imported here: the peer pulls in Raft and storage, which the client
    # commands do not need.
    from raftmesh.mesh.peer import run

    raise SystemExit(run(settings))


@main.command()
@click.option("--nodes", type=click.IntRange(1, HTTP_PORT_OFFSET), default=3, show_default=True)
@click.option(
    "--base-port",
    type=click.IntRange(1, 65535 - 2 * HTTP_PORT_OFFSET),
    help=f"Raft ports from here, HTTP ports from here+{HTTP_PORT_OFFSET} "
    f"[default: {DEFAULT_BASE_PORT}, or any free ports if those are taken]",
)
@click.option(
    "--dir",
    "dir_",
    type=click.Path(file_okay=False, path_type=Path),
    help="Storage, data dirs and logs [default: a temporary dir, removed on exit]",
)
@click.option("--slots", type=click.IntRange(min=0), help="Slots per peer.")
def dev(nodes: int, base_port: int | None, dir_: Path | None, slots: int | None) -> None:
    """Run a local mesh on one SQLite file in the foreground; Ctrl-C stops it."""
    workdir, temporary = _workdir(dir_, "raftmesh-dev-")
    try:
        mesh = DevMesh(workdir, nodes, base_port=base_port, slots=slots)
    except DevMeshError as exc:
        raise click.ClickException(str(exc)) from exc
    code = asyncio.run(_dev(mesh, Console()))
    if code == 0 and temporary:
        shutil.rmtree(workdir, ignore_errors=True)
    raise SystemExit(code)


async def _dev(mesh: DevMesh, console: Console) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    mesh.start()
    try:
        console.print(_peers_table(mesh))
        console.print(f"storage {mesh.storage}; data dirs and logs in {mesh.dir}")
        stopped = asyncio.create_task(stop.wait())
        with console.status("waiting for the peers to elect a leader..."):
            ready = asyncio.create_task(mesh.wait_ready())
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            return 0
        ready.result()
        hints = ["mesh submit echo --input '{\"hello\": 1}' --wait", "mesh status"]
        if mesh.peers[0].url != DEFAULT_PEER_URL:
            hints.insert(0, f"export MESH_PEER_URL={mesh.peers[0].url}")
        console.print("[green]mesh ready[/]; Ctrl-C stops it. Try:")
        for hint in hints:
            console.print(f"  {hint}", soft_wrap=True, markup=False, highlight=False)
        reported: set[str] = set()
        while not stopped.done():
            for peer in mesh.peers:
                if not peer.running and peer.id not in reported:
                    reported.add(peer.id)
                    code = peer.process.returncode if peer.process else None
                    console.print(f"[red]{peer.id} exited[/] (code {code}); see {peer.log_path}")
            await asyncio.wait({stopped}, timeout=1.0)
        return 0
    except DevMeshError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    finally:
        console.print("stopping peers...")
        mesh.stop()


@main.command()
@click.argument("agent")
@click.option("--input", "input_", required=True, callback=lambda c, p, v: _parse_json(v))
@peer_option
@token_option
@click.option("--idempotency-key", help="Submitting the same key again returns the same run.")
@click.option("--tenant")
@click.option("--priority", type=int)
@click.option("--wait", is_flag=True, help="Wait for the run to finish and print it.")
@click.option("--watch", "watch_", is_flag=True, help="Print the run's events live until it ends.")
@click.option(
    "--timeout", type=float, default=300.0, show_default=True, help="Seconds --wait waits."
)
def submit(
    agent: str,
    input_: Any,
    peer: str,
    token: str | None,
    idempotency_key: str | None,
    tenant: str | None,
    priority: int | None,
    wait: bool,
    watch_: bool,
    timeout: float,
) -> None:
    """Submit a run of AGENT with --input JSON and print the answer."""

    async def go(client: MeshClient) -> dict[str, Any]:
        accepted = await client.submit(
            agent, input_, idempotency_key=idempotency_key, tenant=tenant, priority=priority
        )
        if watch_:
            click.echo(f"run {accepted['id']} {accepted['status']}")
            return await follow_run(client, accepted["id"])
        return await client.wait(accepted["id"], timeout) if wait else accepted

    answer = call(peer, token, go)
    if watch_:
        print_end(answer)
    else:
        click.echo(json.dumps(answer, indent=2))


@main.command("run")
@click.argument("run_id")
@peer_option
@token_option
def run_(run_id: str, peer: str, token: str | None) -> None:
    """Print one run as JSON."""
    click.echo(json.dumps(call(peer, token, lambda c: c.get_run(run_id)), indent=2))


@main.command()
@peer_option
@token_option
def status(peer: str, token: str | None) -> None:
    """Show leader, term, peers and queue."""
    info = call(peer, token, MeshClient.cluster)
    console = Console()
    summary = Table(title="Cluster", show_header=False)
    summary.add_row("leader", str(info.get("leader") or "none"))
    summary.add_row("term", str(info.get("term")))
    queue = info.get("queue") or {}
    summary.add_row("queue depth", str(queue.get("depth")))
    summary.add_row("oldest queued", f"{queue.get('oldest_age_s') or 0:.1f} s")
    runs = info.get("runs") or {}
    summary.add_row("waiting", str(runs.get("waiting", 0)))
    summary.add_row("paused", str(runs.get("paused", 0)))
    summary.add_row("voters", ", ".join(info.get("voters") or []))
    console.print(summary)
    peers = Table(title="Peers")
    for column in ("id", "role", "raft", "http", "status", "slots", "running"):
        peers.add_column(column)
    for p in info.get("peers", []):
        name = f"{p['id']} (leader)" if p["id"] == info.get("leader") else p["id"]
        status = p["status"]
        if p.get("drain"):
            status += f", draining ({p['drain']})"
        if p.get("stopping"):
            status += ", stopping"
        peers.add_row(
            name,
            p.get("role", "voter"),
            p["raft"] or "-",
            p["http"],
            status,
            str(p["slots"]),
            str(p["running"]),
        )
    console.print(peers)


# --- demo -------------------------------------------------------------------

DEMO_RUNS = 6
DEMO_INPUT = {"steps": 8, "step_seconds": 0.5}
# Kill once the victim's runs have been running this long: at least two steps
# are then checkpointed (we see "running" no earlier than it started).
KILL_AFTER_S = 2.5 * DEMO_INPUT["step_seconds"]
START_DEADLINE_S = 30.0
FINISH_DEADLINE_S = 90.0


class DemoFailed(Exception):
    """The demo did not show what it promises; the message says what went wrong."""


@main.command()
@click.option(
    "--dir",
    "dir_",
    type=click.Path(file_okay=False, path_type=Path),
    help="Storage, data dirs and logs [default: a temporary dir, removed on success]",
)
def demo(dir_: Path | None) -> None:
    """Kill -9 a peer in the middle of its runs and watch them finish elsewhere."""
    console = Console()
    workdir, temporary = _workdir(dir_, "raftmesh-demo-")
    try:
        mesh = DevMesh(workdir, 3)
        asyncio.run(_demo(mesh, console))
    except (DemoFailed, DevMeshError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        console.print(f"peer logs are in {workdir}")
        raise SystemExit(1) from exc
    except asyncio.CancelledError:
        console.print("demo interrupted; the peers were stopped")
        raise SystemExit(130) from None
    if temporary:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class _Progress:
    """What the demo has seen of each run, polled from whichever peer is alive."""

    submitted_to: dict[str, str]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (run id, owner) → monotonic time it was first seen running there.
    running_since: dict[tuple[str, str], float] = field(default_factory=dict)
    killed_at: float | None = None

    async def refresh(self, mesh: DevMesh, clients: dict[str, MeshClient]) -> list[str]:
        """Poll every run from the first live peer that answers; return what changed.

        If no peer answers (e.g. during an election) the old view is kept and
        the caller's deadline decides when to give up.
        """
        for peer in (p for p in mesh.peers if p.running):
            try:
                runs = await asyncio.gather(
                    *(clients[peer.id].get_run(i) for i in self.submitted_to)
                )
            except (aiohttp.ClientError, TimeoutError, MeshHTTPError):
                continue
            now = time.monotonic()
            when = (
                "" if self.killed_at is None else f", {now - self.killed_at:.1f} s after the kill"
            )
            changes = []
            for run in runs:
                old = self.runs.get(run["id"], {})
                if (old.get("status"), old.get("owner")) != (run["status"], run.get("owner")):
                    changes.append(_describe(run) + when)
                self.runs[run["id"]] = run
                if run["status"] == "running" and run.get("owner"):
                    self.running_since.setdefault((run["id"], run["owner"]), now)
            return changes
        return []

    def finished(self) -> bool:
        return all(
            self.runs.get(i, {}).get("status") in TERMINAL_STATUSES for i in self.submitted_to
        )

    def running_on(self, owner: str) -> list[str]:
        return [i for i, r in self.runs.items() if r["status"] == "running" and r["owner"] == owner]

    def running_for_s(self, run_id: str) -> float:
        run = self.runs[run_id]
        return time.monotonic() - self.running_since[(run_id, run["owner"])]

    def table(self) -> Table:
        table = Table(title="Runs of agent steps (8 steps x 0.5 s)", box=box.SIMPLE_HEAD)
        for column in ("run", "submitted to", "status", "owner", "epoch", "attempts"):
            table.add_column(column)
        for run_id, entry in self.submitted_to.items():
            run = self.runs.get(run_id, {})
            colour = {"succeeded": "green", "running": "yellow"}.get(run.get("status", ""), "red")
            table.add_row(
                _short(run_id),
                entry,
                f"[{colour}]{run.get('status', 'queued')}[/]",
                str(run.get("owner") or "-"),
                str(run.get("epoch") or "-"),
                str(run.get("attempts") or "-"),
            )
        return table

    async def poll(self, mesh: DevMesh, clients: dict[str, MeshClient], live: Live) -> None:
        for change in await self.refresh(mesh, clients):
            live.console.print(change)
        live.update(self.table())


async def _demo(mesh: DevMesh, console: Console) -> None:
    # The peers run in their own sessions: a signal reaches only us, and we
    # must stop them on the way out.
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    console.rule("raftmesh demo")
    console.print(
        f"Starting 3 peers on one SQLite file in {mesh.dir}; each is a Raft member, "
        "an HTTP API and a runner with 4 slots."
    )
    mesh.start()
    try:
        console.print(_peers_table(mesh))
        with console.status("waiting for the peers to elect a leader..."):
            await mesh.wait_ready()
        # The peers inherit MESH_API_TOKEN from this environment; so do we.
        token = os.environ.get("MESH_API_TOKEN") or None
        clients = {p.id: MeshClient(p.url, token, timeout_s=3) for p in mesh.peers}
        try:
            await _demo_scenario(mesh, clients, console)
        finally:
            await asyncio.gather(*(c.close() for c in clients.values()))
    finally:
        console.print("stopping the mesh...")
        mesh.stop()


async def _demo_scenario(mesh: DevMesh, clients: dict[str, MeshClient], console: Console) -> None:
    leader = (await clients[mesh.peers[0].id].cluster()).get("leader")
    console.print(
        f"Leader: {leader}. Submitting {DEMO_RUNS} runs of agent steps with input "
        f"{json.dumps(DEMO_INPUT)}, to each peer in turn; each is acknowledged once a "
        "majority has committed it:"
    )
    submitted_to: dict[str, str] = {}
    for i in range(DEMO_RUNS):
        peer = mesh.peers[i % len(mesh.peers)]
        run_id = (await clients[peer.id].submit("steps", DEMO_INPUT))["id"]
        role = "the leader" if peer.id == leader else "a follower"
        console.print(f"  {run_id} -> {peer.id} ({role})")
        submitted_to[run_id] = peer.id
    progress = _Progress(submitted_to)

    try:
        with Live(progress.table(), console=console, refresh_per_second=4) as live:
            victim, doomed = await _await_victim(mesh, clients, progress, live)
            witness = next(p.id for p in mesh.peers if p.id != victim)
            leader = (await clients[witness].cluster()).get("leader")
            process = mesh.peer(victim).process
            assert process is not None
            live.console.print(
                f"[bold red]kill -9 {victim}[/] (pid {process.pid}): it owns the most running runs "
                f"({len(doomed)} of {DEMO_RUNS}), each running for >= {KILL_AFTER_S:g} s, so at "
                "least steps 0-1 of each are checkpointed"
                + ("; it is also the Raft leader" if victim == leader else "")
                + ". Its runs must be reassigned at a higher epoch and resume after their last "
                "checkpointed step."
            )
            mesh.kill(victim)
            progress.killed_at = time.monotonic()
            deadline = time.monotonic() + FINISH_DEADLINE_S
            while not progress.finished():
                if time.monotonic() > deadline:
                    raise DemoFailed(f"runs not finished {FINISH_DEADLINE_S:g} s after the kill")
                await asyncio.sleep(0.2)
                await progress.poll(mesh, clients, live)
    finally:
        # A Live display that is not on a terminal ends without a newline.
        console.print()

    for run in progress.runs.values():
        if run["status"] != "succeeded":
            raise DemoFailed(f"run {run['id']} ended {run['status']}: {run.get('error')}")
    _report(progress, victim, doomed, console)


async def _await_victim(
    mesh: DevMesh, clients: dict[str, MeshClient], progress: _Progress, live: Live
) -> tuple[str, list[str]]:
    """The peer owning the most running runs, once all of them have checkpointed steps."""
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        await progress.poll(mesh, clients, live)
        owners = Counter(r["owner"] for r in progress.runs.values() if r["status"] == "running")
        if owners:
            victim = owners.most_common(1)[0][0]
            doomed = progress.running_on(victim)
            if all(progress.running_for_s(i) >= KILL_AFTER_S for i in doomed):
                return victim, doomed
        if time.monotonic() > deadline:
            raise DemoFailed(f"no runs were running {START_DEADLINE_S:g} s after submission")
        await asyncio.sleep(0.2)


def _report(progress: _Progress, victim: str, doomed: list[str], console: Console) -> None:
    """Print who ran each step, and check the failover story it tells."""
    steps_n = int(DEMO_INPUT["steps"])
    by_run = {
        run_id: sorted(progress.runs[run_id]["result"]["steps"], key=lambda s: s["index"])
        for run_id in progress.submitted_to
    }
    for run_id, steps in by_run.items():
        indices = [s["index"] for s in steps]
        if indices != list(range(steps_n)):
            raise DemoFailed(
                f"run {run_id}: step indices {indices}, expected 0..{steps_n - 1} once"
            )
    table = Table(title=f"Who ran each step: peer/epoch ({victim} was killed)", box=box.SIMPLE_HEAD)
    table.add_column("step")
    for run_id in by_run:
        table.add_column(_short(run_id))
    for i in range(steps_n):
        cells = [_step_cell(steps[i], victim) for steps in by_run.values()]
        table.add_row(str(i), *cells)
    console.print(table)
    for run_id in doomed:
        console.print(_failover_line(run_id, by_run[run_id], victim))
    console.print(
        f"[bold green]All {DEMO_RUNS} runs succeeded; {len(doomed)} survived the kill of "
        f"{victim} without repeating a checkpointed step.[/]"
    )


def _failover_line(run_id: str, steps: list[dict[str, Any]], victim: str) -> str:
    """One sentence per failed-over run, after checking that it really failed over."""
    before = [s for s in steps if s["peer"] == victim]
    after = [s for s in steps if s["peer"] != victim]
    if not before or not after:
        raise DemoFailed(
            f"run {run_id} was on {victim} when it was killed, but its steps say {steps}"
        )
    if [s["index"] for s in before] != list(range(len(before))):
        raise DemoFailed(
            f"run {run_id}: steps on {victim} are not the ones before the kill: {steps}"
        )
    old_epochs = {s["epoch"] for s in before}
    if len(old_epochs) != 1 or min(s["epoch"] for s in after) <= max(old_epochs):
        raise DemoFailed(f"run {run_id}: the epoch did not go up after the kill: {steps}")
    new_peers = ", ".join(sorted({s["peer"] for s in after}))
    return (
        f"run {_short(run_id)}: steps 0-{before[-1]['index']} ran on {victim} at epoch "
        f"{before[0]['epoch']} before the kill; steps {after[0]['index']}-{after[-1]['index']} "
        f"on {new_peers} at epoch {after[0]['epoch']}; no step ran twice"
    )


def _describe(run: dict[str, Any]) -> str:
    where = f" on {run['owner']} (epoch {run['epoch']})" if run.get("owner") else ""
    return f"run {_short(run['id'])}: {run['status']}{where}"


def _step_cell(step: dict[str, Any], victim: str) -> str:
    text = f"{step['peer']}/e{step['epoch']}"
    return f"[red]{text}[/]" if step["peer"] == victim else text


def _short(run_id: str) -> str:
    """Enough of a run id to tell the demo's runs apart on an 80-column terminal."""
    return run_id[:8]


# --- helpers ----------------------------------------------------------------


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from exc


def _workdir(given: Path | None, prefix: str) -> tuple[Path, bool]:
    """The directory to use, and whether it is a temporary one of ours to remove."""
    if given is not None:
        return given, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def _peers_table(mesh: DevMesh) -> Table:
    table = Table(title=f"{len(mesh.peers)} local peers")
    for column in ("id", "http", "raft", "log"):
        table.add_column(column)
    for peer in mesh.peers:
        table.add_row(peer.id, peer.url, peer.raft, str(peer.log_path))
    return table


main.add_command(watch)
main.add_command(agents)
main.add_command(run_control.cancel)
main.add_command(run_control.retry)
main.add_command(run_control.pause)
main.add_command(run_control.resume)
main.add_command(run_control.signal)
main.add_command(schedule)
main.add_command(doctor)
