"""Agents every peer has (``chat`` lives in its own module)."""

from __future__ import annotations

import asyncio
from typing import Any

from raftmesh.runner.context import RunContext
from raftmesh.runner.registry import agent


@agent("echo")
async def echo(ctx: RunContext, input: Any) -> Any:
    return input


@agent("sleep")
async def sleep(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    seconds = float(input.get("seconds", 1))
    await asyncio.sleep(seconds)
    return {"slept_s": seconds}
