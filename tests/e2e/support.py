"""Helpers for end-to-end tests: poll against a deadline, never sleep and hope."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.mesh.devmesh import DevMesh

PG_URL = os.environ.get("RAFTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
# What the make_mesh fixture gives: make_mesh(backend, nodes=3, ...) -> a started DevMesh.
MakeMesh = Callable[..., Awaitable[DevMesh]]

T = TypeVar("T")

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout_s: float, what: str, poll_s: float = 0.1
) -> T:
    """Return check()'s first truthy value, or fail naming ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = await check()
            if value:
                return value
        except (MeshHTTPError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {what}; last error: {last_error!r}"
            )
        await asyncio.sleep(poll_s)


async def submit_retrying(
    client: MeshClient, agent: str, input: Any, timeout_s: float = 30, **kw: Any
) -> dict[str, Any]:
    """Submit as a real client would: an idempotency key, retried through outages."""
    key = kw.pop("idempotency_key", None)

    async def attempt() -> dict[str, Any] | None:
        try:
            return await client.submit(agent, input, idempotency_key=key, **kw)
        except MeshHTTPError as exc:
            if exc.status == 503:
                return None
            raise

    return await eventually(attempt, timeout_s, f"submission of {agent}")


async def wait_all_terminal(
    client: MeshClient, ids: list[str], timeout_s: float
) -> dict[str, dict[str, Any]]:
    async def check() -> dict[str, dict[str, Any]] | None:
        runs = {i: await client.get_run(i) for i in ids}
        return runs if all(r["status"] in TERMINAL for r in runs.values()) else None

    return await eventually(check, timeout_s, f"{len(ids)} runs to finish", poll_s=0.3)
