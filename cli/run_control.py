"""``mesh cancel``, ``retry``, ``pause``, ``resume`` and ``signal``: an
operator's hands on single runs."""

from __future__ import annotations

import json
from typing import Any

import click

from raftmesh.cli.remote import call, peer_option, token_option


@click.command()
@click.argument("run_id")
@peer_option
@token_option
def cancel(run_id: str, peer: str, token: str | None) -> None:
    """Cancel RUN_ID: a queued run ends at once, a running one is stopped by its owner."""
    click.echo(json.dumps(call(peer, token, lambda c: c.cancel(run_id)), indent=2))


@click.command()
@click.argument("run_id")
@peer_option
@token_option
def retry(run_id: str, peer: str, token: str | None) -> None:
    """Queue RUN_ID again if it failed or timed out (a dead letter)."""
    click.echo(json.dumps(call(peer, token, lambda c: c.retry(run_id)), indent=2))


@click.command()
@click.argument("run_id")
@peer_option
@token_option
def pause(run_id: str, peer: str, token: str | None) -> None:
    """Pause RUN_ID: a queued or waiting run at once, a running one at its next
    step boundary (its checkpoints kept, its slot freed)."""
    click.echo(json.dumps(call(peer, token, lambda c: c.pause(run_id)), indent=2))


@click.command()
@click.argument("run_id")
@peer_option
@token_option
def resume(run_id: str, peer: str, token: str | None) -> None:
    """Resume paused RUN_ID: it is queued again and picks up where it stopped."""
    click.echo(json.dumps(call(peer, token, lambda c: c.resume(run_id)), indent=2))


@click.command()
@click.argument("run_id")
@click.argument("name")
@click.option("--data", default="null", show_default=True, help="The signal's data, as JSON.")
@click.option("--key", help="Idempotency key: the same key again is delivered once.")
@peer_option
@token_option
def signal(
    run_id: str, name: str, data: str, key: str | None, peer: str, token: str | None
) -> None:
    """Send RUN_ID the signal NAME; its wait_for_signal(NAME) returns --data."""
    value = _json_data(data)
    sent = call(peer, token, lambda c: c.signal(run_id, name, value, idempotency_key=key))
    click.echo(json.dumps(sent, indent=2))


def _json_data(text: str) -> Any:
    """A one-line error, before anything is sent, if ``text`` is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"--data is not valid JSON: {exc}") from None
