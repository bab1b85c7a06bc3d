"""``mesh join``, ``mesh leave``, ``mesh drain``, ``mesh undrain``.

Scriptable: one line of outcome on stdout (JSON with --json), errors as one
line on stderr with exit status 1, usage errors with 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import click

from consensus.raft import persisted_voters
from mesh.client import MeshClient, MeshHTTPError
from mesh.devmesh import DEFAULT_BASE_PORT, HTTP_PORT_OFFSET
from mesh.settings import Settings, SettingsError

T = TypeVar("T")

peer_option = click.option(
    "--peer",
    envvar="MESH_PEER_URL",
    default=f"http://127.0.0.1:{DEFAULT_BASE_PORT + HTTP_PORT_OFFSET}",
    show_default=True,
    help="Base URL of any peer (env MESH_PEER_URL).",
)
token_option = click.option(
    "--token", envvar="MESH_API_TOKEN", default=None, help="API bearer token (env MESH_API_TOKEN)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")


def _call(
    peer: str, token: str | None, timeout_s: float, fn: Callable[[MeshClient], Awaitable[T]]
) -> T:
    async def go() -> T:
        async with MeshClient(peer, token, timeout_s=timeout_s) as client:
            return await fn(client)

    try:
        return asyncio.run(go())
    except MeshHTTPError as exc:
        raise click.ClickException(
            f"{peer} answered {exc.status} {exc.code}: {exc.message}"
        ) from exc
    except aiohttp.ClientError as exc:
        raise click.ClickException(f"cannot reach {peer}: {exc}") from exc
    except TimeoutError as exc:
        raise click.ClickException(f"{peer} did not answer within {timeout_s:g} s") from exc


def _print(answer: dict[str, Any], as_json: bool, line: str) -> None:
    click.echo(json.dumps(answer) if as_json else line)


@click.command()
@click.argument("seed_url")
@click.option("--id", "id_", required=True, help="The new peer's id; must not be in use.")
@click.option("--raft", help="Raft bind address HOST:PORT (voters only).")
@click.option("--http", required=True, help="HTTP API bind address HOST:PORT.")
@click.option(
    "--executor", is_flag=True, help="Join as a non-voting executor (runs work, no vote)."
)
@click.option("--storage", help="postgresql://... or sqlite:///path (env MESH_STORAGE).")
@click.option("--data-dir", help="Raft journal and snapshots (env MESH_DATA_DIR).")
@click.option("--slots", type=int, help="Concurrent runs on this peer (env MESH_SLOTS).")
@click.option("--secret", help="Cluster secret for Raft traffic (env MESH_SECRET).")
@click.option("--labels", help="Slot labels k=v,k=v (env MESH_LABELS).")
@click.option("--api-token", help="Require this bearer token on the API (env MESH_API_TOKEN).")
@click.option(
    "--config", type=click.Path(dir_okay=False), envvar="MESH_CONFIG", help="TOML settings file."
)
def join(seed_url: str, id_: str, executor: bool, config: str | None, **flags: Any) -> None:
    """Join the mesh that SEED_URL (any peer's API) belongs to, then run this peer.

    The peer is admitted first (its id reserved, and as a voter added to Raft);
    then it starts, receives the state and takes runs. Started again from the
    same --data-dir, it comes back as the same member (use `mesh up` or this).
    """
    role = "executor" if executor else "voter"
    try:
        settings = Settings.load({**flags, "id": id_, "role": role}, config)
        settings.effective_secret()
    except (SettingsError, OSError, tomllib.TOMLDecodeError) as exc:
        raise click.UsageError(str(exc)) from exc
    if role == "voter" and not flags.get("raft") and not os.environ.get("MESH_RAFT"):
        raise click.UsageError("a voter needs --raft HOST:PORT (or join with --executor)")
    try:
        known = persisted_voters(settings.data_dir)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if known is None:
        raft = settings.raft if role == "voter" else None
        token = settings.api_token or None
        answer = _call(
            seed_url, token, 60, lambda c: c.join(settings.id, settings.http, raft, role)
        )
        known = list(answer["voters"])
        click.echo(f"joined as {role} {settings.id}; voters: {', '.join(known)}", err=True)
    else:
        click.echo(f"{settings.data_dir} is already a member: starting it", err=True)
    partners = tuple(v for v in known if v != settings.raft or role == "executor")
    settings = Settings.load(
        {**flags, "id": id_, "role": role, "peers": ",".join(partners)}, config
    )
    from mesh.peer import run

    raise SystemExit(run(settings))


@click.command()
@click.argument("peer_id", required=False)
@peer_option
@token_option
@click.option(
    "--release", is_flag=True, help="Hand running runs back at their next step instead of waiting."
)
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the answer.",
)
@json_option
def leave(
    peer_id: str | None, peer: str, token: str | None, release: bool, timeout: float, as_json: bool
) -> None:
    """Drain a peer and remove it from the mesh (default: the peer at --peer).

    A peer that is up is asked to leave itself, so its runs drain first; a
    peer that is down is removed through --peer. The peer process exits 0.
    """

    async def go(client: MeshClient) -> dict[str, Any]:
        cluster = await client.cluster()
        target = peer_id or cluster["self"]
        member = next((p for p in cluster["peers"] if p["id"] == target), None)
        if member is None or target == cluster["self"] or member["status"] != "up":
            return await client.leave(target, release)
        async with MeshClient(f"http://{member['http']}", token, timeout_s=timeout) as own:
            return await own.leave(target, release)

    answer = _call(peer, token, timeout, go)
    _print(answer, as_json, f"{answer['id']} left the mesh ({answer['requeued']} runs requeued)")


@click.command()
@click.argument("peer_id")
@peer_option
@token_option
@click.option("--release", is_flag=True, help="Hand its running runs back at their next step.")
@json_option
def drain(peer_id: str, peer: str, token: str | None, release: bool, as_json: bool) -> None:
    """Assign nothing new to PEER_ID; its runs finish there (or, with --release, move)."""
    answer = _call(peer, token, 30, lambda c: c.drain(peer_id, release))
    _print(
        answer, as_json, f"{peer_id} draining ({answer['drain']}); {answer['running']} runs there"
    )


@click.command()
@click.argument("peer_id")
@peer_option
@token_option
@json_option
def undrain(peer_id: str, peer: str, token: str | None, as_json: bool) -> None:
    """Let PEER_ID take runs again."""
    answer = _call(peer, token, 30, lambda c: c.undrain(peer_id))
    _print(answer, as_json, f"{peer_id} takes runs again")


COMMANDS = [join, leave, drain, undrain]
