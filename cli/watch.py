"""``mesh watch``, ``mesh submit --watch`` and ``mesh agents``: following runs live.

A watch survives a broken stream (a restarting peer, a proxy timeout): it
reconnects to its peer with the last event id it printed, for up to a minute
without progress, so the terminal shows every event once, in order.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import click

from raftmesh.cli.remote import call, peer_option, token_option
from raftmesh.mesh.client import MeshClient, MeshHTTPError

RECONNECT_S = 0.5


async def follow_run(
    client: MeshClient, run_id: str, reconnect_for_s: float = 60.0
) -> dict[str, Any]:
    """Print the run's events as they are stored; return the ``end`` event's data."""
    last: int | None = None
    gave_up_at = None
    loop = asyncio.get_running_loop()
    while True:
        try:
            async for msg in client.events(run_id, last_event_id=last):
                gave_up_at = None
                if msg.event == "end":
                    return dict(msg.data)
                last = msg.id
                event = msg.data
                click.echo(f"{event['seq']:>5}  {event['kind']:<12} {json.dumps(event['data'])}")
        except (aiohttp.ClientError, TimeoutError, MeshHTTPError) as exc:
            if isinstance(exc, MeshHTTPError) and exc.status < 500:
                raise
            gave_up_at = gave_up_at or loop.time() + reconnect_for_s
            if loop.time() > gave_up_at:
                raise
            click.echo(
                f"      (stream interrupted: {exc}; resuming after event {last or 0})", err=True
            )
            await asyncio.sleep(RECONNECT_S)


def print_end(end: dict[str, Any]) -> None:
    line = f"run {end['status']}"
    if end.get("error"):
        line += f": {end['error']}"
    click.echo(line)
    if end["status"] != "succeeded":
        raise SystemExit(1)


@click.command()
@click.argument("run_id")
@peer_option
@token_option
def watch(run_id: str, peer: str, token: str | None) -> None:
    """Follow RUN_ID's events live until it ends (any peer serves them)."""
    print_end(call(peer, token, lambda c: follow_run(c, run_id)))


@click.command()
@peer_option
@token_option
def agents(peer: str, token: str | None) -> None:
    """List the agents each peer can run."""

    async def go(client: MeshClient) -> list[tuple[str, str, list[str] | None]]:
        cluster = await client.cluster()
        rows = []
        for p in cluster["peers"]:
            async with client.sibling(p["http"], 3) as other:
                try:
                    names = (await other.agents())["agents"]
                except (aiohttp.ClientError, TimeoutError, MeshHTTPError):
                    names = None
            rows.append((p["id"], p["status"], names))
        return rows

    for peer_id, status, names in call(peer, token, go):
        shown = ", ".join(names) if names is not None else "(unreachable)"
        click.echo(f"{peer_id:<12} {status:<6} {shown}")
