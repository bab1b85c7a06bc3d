"""``mesh schedule add|ls|rm|pause|resume``: replicated schedules over the API."""

from __future__ import annotations

import json
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from raftmesh.cli.remote import call, peer_option, token_option


def _json_value(ctx: click.Context, param: click.Parameter, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", ctx, param) from exc


@click.group()
def schedule() -> None:
    """Schedules: an agent run on every tick of a cron expression or a period,
    fired by whichever peer leads (each tick once)."""


@schedule.command("add")
@click.argument("schedule_id")
@click.option("--agent", required=True, help="The agent each tick runs.")
@click.option("--input", "input_", default="null", callback=_json_value, help="JSON input.")
@click.option("--cron", help="Cron expression (a 6th field is seconds).")
@click.option("--every", "every_s", type=float, help="Period in seconds.")
@click.option("--timezone", help="IANA time zone of the cron expression (default UTC).")
@click.option("--tenant")
@click.option("--overlap", type=click.Choice(["skip", "allow", "cancel_previous"]))
@click.option("--catchup", type=click.Choice(["none", "one", "all"]))
@peer_option
@token_option
def add(
    schedule_id: str,
    agent: str,
    input_: Any,
    cron: str | None,
    every_s: float | None,
    timezone: str | None,
    tenant: str | None,
    overlap: str | None,
    catchup: str | None,
    peer: str,
    token: str | None,
) -> None:
    """Create SCHEDULE_ID with --cron or --every."""
    if (cron is None) == (every_s is None):
        raise click.UsageError("give exactly one of --cron and --every")
    answer = call(
        peer,
        token,
        lambda c: c.add_schedule(
            schedule_id,
            agent,
            input_,
            cron=cron,
            every_s=every_s,
            timezone=timezone,
            tenant=tenant,
            overlap=overlap,
            catchup=catchup,
        ),
    )
    click.echo(json.dumps(answer, indent=2))


@schedule.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@peer_option
@token_option
def ls(as_json: bool, peer: str, token: str | None) -> None:
    """List schedules."""
    answer = call(peer, token, lambda c: c.schedules())
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    table = Table(box=box.SIMPLE)
    for column in ("id", "when", "agent", "tenant", "state", "fired", "skipped", "next"):
        table.add_column(column)
    for s in answer["schedules"]:
        when = s["cron"] or f"every {s['every_s']:g}s"
        table.add_row(
            s["id"],
            f"{when} {s['timezone']}",
            s["agent"],
            s["tenant"],
            "paused" if s["paused"] else "active",
            str(s["fired"]),
            str(s["skipped"]),
            "-" if s["next_tick_at"] is None else f"{s['next_tick_at']:.3f}",
        )
    Console().print(table)


@schedule.command("rm")
@click.argument("schedule_id")
@peer_option
@token_option
def rm(schedule_id: str, peer: str, token: str | None) -> None:
    """Delete SCHEDULE_ID; runs it started go on."""
    click.echo(json.dumps(call(peer, token, lambda c: c.delete_schedule(schedule_id)), indent=2))


@schedule.command("pause")
@click.argument("schedule_id")
@peer_option
@token_option
def pause(schedule_id: str, peer: str, token: str | None) -> None:
    """Stop SCHEDULE_ID firing until it is resumed."""
    click.echo(json.dumps(call(peer, token, lambda c: c.pause_schedule(schedule_id)), indent=2))


@schedule.command("resume")
@click.argument("schedule_id")
@peer_option
@token_option
def resume(schedule_id: str, peer: str, token: str | None) -> None:
    """Fire SCHEDULE_ID again from its next tick (ticks due while paused are dropped)."""
    click.echo(json.dumps(call(peer, token, lambda c: c.resume_schedule(schedule_id)), indent=2))
