"""``mesh cancel`` and ``mesh retry``: an operator's hands on single runs."""

from __future__ import annotations

import json

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
