"""Built-in agents for the demo, the tests and the benchmarks."""

from __future__ import annotations

import asyncio
from typing import Any

from runner.context import RunContext
from runner.registry import agent


@agent("echo")
async def echo(ctx: RunContext, input: Any) -> Any:
    return input


@agent("sleep")
async def sleep(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    seconds = float(input.get("seconds", 1))
    await asyncio.sleep(seconds)
    return {"slept_s": seconds}


@agent("steps")
async def steps(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """``n`` journaled steps; each records which peer and epoch executed it, so
    a failover shows that no checkpointed step ran twice."""
    count = int(input.get("steps", 5))
    step_s = float(input.get("step_seconds", 0.5))

    async def one(index: int) -> dict[str, Any]:
        await asyncio.sleep(step_s)
        return {"index": index, "peer": ctx.peer_id, "epoch": ctx.epoch}

    done = []
    for i in range(count):
        done.append(await ctx.step(f"step-{i}", one, i))
        ctx.emit("progress", {"done": i + 1, "of": count})
    return {"steps": done}


@agent("fail")
async def fail(ctx: RunContext, input: Any) -> Any:
    raise RuntimeError(f"asked to fail: {input!r}")
