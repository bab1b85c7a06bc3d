"""Agents for the demo, the tests, the benchmarks and the chaos harness.

Not on a production peer: ``hog`` allocates inside the peer and ``fanout``
fills the queue. ``mesh dev`` and the test meshes load this module, and a peer
does with ``--demo-agents``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from raftmesh.runner.context import RunContext
from raftmesh.runner.registry import agent


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


@agent("durable")
async def durable(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """``steps`` journaled steps with a durable sleep after ``sleep_after`` of
    them: a run resumed elsewhere replays the steps and sleeps only what is
    left of the timer."""
    count = int(input.get("steps", 10))
    step_s = float(input.get("step_seconds", 0.2))
    sleep_after = int(input.get("sleep_after", count // 2))
    sleep_s = float(input.get("sleep_seconds", 2))

    async def one(index: int) -> dict[str, Any]:
        await asyncio.sleep(step_s)
        return {"index": index, "peer": ctx.peer_id, "epoch": ctx.epoch}

    done = []
    for i in range(count):
        if i == sleep_after:
            await ctx.sleep(sleep_s)
        done.append(await ctx.step(f"step-{i}", one, i))
        ctx.emit("progress", {"done": i + 1, "of": count})
    return {"steps": done}


@agent("fanout")
async def fanout(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """Spawns ``children`` children (``fanout`` again while ``levels`` > 1, else
    ``echo``), each granted ``child_budget``; then spends ``spend`` of its own
    budget. Exercises the runtime's fan-out, depth and budget limits."""
    levels = int(input.get("levels", 1))
    n = int(input.get("children", 2))
    grant = input.get("child_budget")
    for key, amount in (input.get("spend") or {}).items():
        ctx.charge(**{key: int(amount)})
    if levels <= 1:
        handles = [ctx.spawn("echo", {"child": i}, budget=grant) for i in range(n)]
    else:
        child_input = {**input, "levels": levels - 1, "spend": None}
        handles = [ctx.spawn("fanout", child_input, budget=grant) for _ in range(n)]
    results = await ctx.gather(*handles)
    ctx.emit("children", {"count": len(results)})
    return {"depth": ctx.depth, "children": results}


@agent("hog")
async def hog(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """Allocates and touches ``mb`` MiB: run it with ``isolation: "process"`` to
    see a memory limit fail the attempt instead of the peer."""
    mb = int(input.get("mb", 64))
    chunks = [bytearray(1 << 20) for _ in range(mb)]
    return {"allocated_mb": len(chunks), "pid": os.getpid()}


@agent("flaky")
async def flaky(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """Fails its first ``fail_attempts`` attempts, then succeeds: retries made visible."""
    if ctx.attempt <= int(input.get("fail_attempts", 1)):
        raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
    return {"attempt": ctx.attempt}
