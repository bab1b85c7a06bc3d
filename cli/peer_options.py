"""The settings flags every command that starts a peer takes (`mesh up`,
`mesh join`), declared once so their names and help cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = [
    click.option("--storage", help="postgresql://... or sqlite:///path (env MESH_STORAGE)."),
    click.option("--data-dir", help="Raft journal and snapshots (env MESH_DATA_DIR)."),
    click.option("--slots", type=int, help="Concurrent runs on this peer (env MESH_SLOTS)."),
    click.option("--secret", help="Cluster secret for Raft traffic (env MESH_SECRET)."),
    click.option("--labels", help="Slot labels k=v,k=v (env MESH_LABELS)."),
    click.option("--api-token", help="Require this bearer token on the API (env MESH_API_TOKEN)."),
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
