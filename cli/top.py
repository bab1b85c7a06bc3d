"""``mesh top``: the web UI's Overview in a terminal, refreshed every second.

``render`` is pure (one /v1/cluster answer in, one rich renderable out), so
what it shows is tested without a terminal; the command only polls and draws.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from raftmesh.cli.remote import ca_path, peer_option, token_option
from raftmesh.mesh.client import MeshClient, MeshHTTPError

_SPARK = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[int]) -> str:
    top = max(values, default=0)
    if top == 0:
        return _SPARK[1] * len(values)
    return "".join(_SPARK[1 + round(v * (len(_SPARK) - 2) / top)] for v in values)


def _bar(used: int, offered: int, width: int = 10) -> str:
    filled = 0 if offered <= 0 else min(width, round(width * used / offered))
    return "█" * filled + "·" * (width - filled)


def render(info: dict[str, Any], source: str, at: float) -> Group:
    queue = info.get("queue") or {}
    runs = info.get("runs") or {}
    peers = info.get("peers") or []
    up = [p for p in peers if p["status"] == "up"]
    used = sum(p["running"] for p in up)
    offered = sum(p["slots"] for p in up)
    series = (info.get("throughput") or {}).get("series") or []
    bucket_s = (info.get("throughput") or {}).get("bucket_s", 10)

    summary = Table.grid(padding=(0, 3))
    for _ in range(4):
        summary.add_column()
    summary.add_row(
        f"leader [bold]{info.get('leader') or '[red]none[/]'}[/]",
        f"term [bold]{info.get('term')}[/]",
        f"queue [bold]{queue.get('depth', 0)}[/]",
        f"oldest queued [bold]{queue.get('oldest_age_s') or 0:.1f} s[/]",
    )
    summary.add_row(
        f"running [bold]{runs.get('running', used)}[/]",
        f"slots [bold]{used} / {offered}[/]",
        f"waiting [bold]{runs.get('waiting', 0)}[/]",
        f"paused [bold]{runs.get('paused', 0)}[/]",
    )

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("peer", "role", "status", "slots used / offered", "drain"):
        table.add_column(column)
    for p in peers:
        colour = {"up": "green", "down": "red"}.get(p["status"], "yellow")
        name = f"{p['id']} (leader)" if p["id"] == info.get("leader") else p["id"]
        drain = (
            f"draining ({p['drain']})"
            if p.get("drain")
            else "stopping"
            if p.get("stopping")
            else ""
        )
        table.add_row(
            name,
            p.get("role", "voter"),
            f"[{colour}]{p['status']}[/]",
            f"{_bar(p['running'], p['slots'])} {p['running']} / {p['slots']}",
            drain,
        )

    parts: list[Any] = [summary, Text(""), table, Text("")]
    finished = [b["finished"] for b in series]
    submitted = [b["submitted"] for b in series]
    parts.append(Text(f"finished  {sparkline(finished)}  {sum(finished[-6:])} in the last minute"))
    parts.append(Text(f"submitted {sparkline(submitted)}  per {bucket_s:g} s, last 5 min"))
    waiting = queue.get("waiting_for") or {}
    if waiting:
        parts.append(Text(""))
        for reason, n in waiting.items():
            parts.append(Text(f"{n:>5} queued: {reason}"))
    stamp = time.strftime("%H:%M:%S", time.localtime(at))
    parts.append(Text(f"\n{source} at {stamp}; Ctrl-C quits", style="dim"))
    return Group(*parts)


@click.command()
@peer_option
@token_option
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True)
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
def top(peer: str, token: str | None, interval: float, once: bool) -> None:
    """A live view of the mesh: leader, peers, slots, queue, throughput."""
    console = Console()
    try:
        asyncio.run(_top(peer, token, interval, once, console))
    except KeyboardInterrupt:
        pass


async def _top(peer: str, token: str | None, interval: float, once: bool, console: Console) -> None:
    async with MeshClient(peer, token, timeout_s=max(2.0, interval), ca=ca_path()) as client:
        if once:
            console.print(render(await _cluster(client, peer), peer, time.time()))
            return
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                try:
                    frame: Any = render(await _cluster(client, peer), peer, time.time())
                except click.ClickException as exc:
                    # A peer restarting is what an operator watches for: keep polling.
                    frame = Text(f"{exc.message}; retrying", style="red")
                live.update(frame, refresh=True)
                await asyncio.sleep(interval)


async def _cluster(client: MeshClient, peer: str) -> dict[str, Any]:
    try:
        return await client.cluster()
    except MeshHTTPError as exc:
        raise click.ClickException(
            f"{peer} answered {exc.status} {exc.code}: {exc.message}"
        ) from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise click.ClickException(f"cannot reach {peer}: {exc or 'timed out'}") from exc
