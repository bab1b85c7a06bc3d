"""The settings flags every command that starts a peer takes (`mesh up`,
`mesh join`), declared once so their names and help cannot drift apart.

The secrets' flags still work but warn: argv is visible to every user in
``ps``. Secrets belong in the environment or, better, in a file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from click.core import ParameterSource

F = TypeVar("F", bound=Callable[..., Any])


def deprecated_secret_flag(env: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: warn (one line on stderr) when the flag is given on the command line."""

    def warn(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        assert param.name is not None
        if (
            value is not None
            and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE
        ):
            flag = param.opts[0]
            click.echo(
                f"warning: {flag} is deprecated (argv shows in ps): "
                f"set {env}_FILE to a file holding it, or {env}",
                err=True,
            )
        return value

    return warn


_OPTIONS = [
    click.option("--storage", help="postgresql://... or sqlite:///path (env MESH_STORAGE)."),
    click.option("--data-dir", help="Raft journal and snapshots (env MESH_DATA_DIR)."),
    click.option("--slots", type=int, help="Concurrent runs on this peer (env MESH_SLOTS)."),
    click.option(
        "--secret",
        callback=deprecated_secret_flag("MESH_SECRET"),
        help="Deprecated: use MESH_SECRET_FILE (or MESH_SECRET). Cluster secret for Raft traffic.",
    ),
    click.option("--labels", help="Slot labels k=v,k=v (env MESH_LABELS)."),
    click.option(
        "--api-token",
        callback=deprecated_secret_flag("MESH_API_TOKEN"),
        help="Deprecated: use MESH_API_TOKEN_FILE (or MESH_API_TOKEN). Bearer token for the API.",
    ),
    click.option(
        "--api-tokens-file",
        help="TOML file of [[token]] tables (sha256, tenant, admin) (env MESH_API_TOKENS_FILE).",
    ),
    click.option(
        "--insecure-no-auth",
        is_flag=True,
        default=None,
        help="Serve the API without tokens on a non-loopback address (env MESH_INSECURE_NO_AUTH).",
    ),
    click.option("--tls-cert", help="PEM certificate: serve HTTPS (env MESH_TLS_CERT)."),
    click.option("--tls-key", help="PEM private key of --tls-cert (env MESH_TLS_KEY)."),
    click.option(
        "--ca", help="PEM CA the other peers' certificates are checked against (env MESH_CA)."
    ),
    click.option(
        "--suspend-after-s",
        type=click.FloatRange(min=0),
        help="A wait at least this long leaves its slot [default: 5] (env MESH_SUSPEND_AFTER_S).",
    ),
    click.option(
        "--demo-agents",
        is_flag=True,
        default=None,
        help="Also run the demo agents: steps, fail, fanout, hog, ... (env MESH_DEMO_AGENTS).",
    ),
    click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        help="Least severe level logged [default: info] (env MESH_LOG_LEVEL).",
    ),
    click.option(
        "--log-format",
        type=click.Choice(["auto", "json", "logfmt"]),
        help="JSON lines, logfmt, or auto: logfmt at a terminal [default: auto] (env MESH_LOG_FORMAT).",
    ),
]


def peer_settings_options(fn: F) -> F:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn
