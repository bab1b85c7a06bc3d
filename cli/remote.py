"""Talking to a peer from the command line: the --peer and --token options and
one call wrapper that turns every client failure into a one-line CLI error.

The token comes from the file MESH_API_TOKEN_FILE names, or MESH_API_TOKEN;
``--token`` still works, with a warning, since argv shows in ``ps``; a token
inside the --peer URL is refused. An https peer is checked against ``mesh --ca``
(MESH_CA), else the system's roots."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import click

from raftmesh.cli.peer_options import deprecated_secret_flag
from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.mesh.devmesh import DEFAULT_BASE_PORT, HTTP_PORT_OFFSET
from raftmesh.mesh.settings import SettingsError, read_secret_file

T = TypeVar("T")

# The first peer of `mesh dev` with its default ports.
DEFAULT_PEER_URL = f"http://127.0.0.1:{DEFAULT_BASE_PORT + HTTP_PORT_OFFSET}"

peer_option = click.option(
    "--peer",
    envvar="MESH_PEER_URL",
    default=DEFAULT_PEER_URL,
    show_default=True,
    help="Base URL of any peer (env MESH_PEER_URL).",
)


def _token(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    value = deprecated_secret_flag("MESH_API_TOKEN")(ctx, param, value)
    path = os.environ.get("MESH_API_TOKEN_FILE")
    if value is None and path:
        try:
            return read_secret_file(path, "API token")
        except SettingsError as exc:
            raise click.BadParameter(str(exc), ctx, param) from exc
    return value


token_option = click.option(
    "--token",
    envvar="MESH_API_TOKEN",
    default=None,
    callback=_token,
    help="Deprecated: use MESH_API_TOKEN_FILE (or MESH_API_TOKEN). Bearer token for the API.",
)


def ca_path() -> str | None:
    """The CA an https peer is checked against: ``mesh --ca`` or MESH_CA."""
    ctx = click.get_current_context(silent=True)
    ca = ctx.find_root().params.get("ca") if ctx is not None else None
    return ca or os.environ.get("MESH_CA") or None


def call(
    peer: str,
    token: str | None,
    fn: Callable[[MeshClient], Awaitable[T]],
    timeout_s: float = 10.0,
) -> T:
    """Run one client interaction against ``peer``; failures exit with one line."""

    parts = urlsplit(peer)
    if parts.username or parts.password or parts.query:
        raise click.UsageError(
            "--peer must be a bare base URL: a token in it would show in ps and in logs; "
            "put the token in the file MESH_API_TOKEN_FILE names"
        )
    ca = ca_path()

    async def go() -> T:
        async with MeshClient(peer, token, timeout_s=timeout_s, ca=ca) as client:
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
        raise click.ClickException(
            str(exc) or f"{peer} did not answer within {timeout_s:g} s"
        ) from exc
