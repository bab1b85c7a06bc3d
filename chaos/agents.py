"""The workload's agents, loaded into every peer with ``MESH_AGENT_MODULES=chaos.agents``.

``chaos`` takes ``steps`` journaled steps of ``step_s`` seconds each and logs
every execution to the side-effect ledger (chaos.ledger) before and after the
step's side effect, so a step that ran twice shows up even if only one of its
runs could be checkpointed. Each step also emits an event, which gives the
checker a per-run, storage-ordered stream of epochs to spot stale writes in.

The others wait, so that faults hit runs that suspend and resume: ``chaos_sleep``
sleeps past the peers' ``suspend_after_s`` between its steps, ``chaos_signal``
waits for ``signals`` signals named ``go`` and returns their data in the order
it received them (invariant 8 is judged on that list), and ``chaos_parent``
awaits children of ``chaos``. An attempt that suspends (or is released, as
a pause does) says so in the ledger, so the checker does not take a run that
left its slot for one whose owner was lost.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from raftmesh.chaos.history import SIGNAL_NAME
from raftmesh.chaos.ledger import (
    ATTEMPT_END,
    ATTEMPT_START,
    ATTEMPT_SUSPEND,
    LEDGER_DIR_ENV,
    STEP_END,
    STEP_START,
    LedgerEntry,
    LedgerWriter,
)
from raftmesh.runner.context import Released, RunContext, Suspending
from raftmesh.runner.registry import agent


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Attempt:
    """One attempt's ledger: its start, its steps' side effects, how it ended.
    A step's ledger ``seq`` is its position in the run's journal (sleeps,
    spawns and signal waits take positions too), which is how storage names
    the checkpoint the checker compares it with."""

    def __init__(self, ctx: RunContext) -> None:
        directory = os.environ.get(LEDGER_DIR_ENV)
        if not directory:
            raise RuntimeError(f"{LEDGER_DIR_ENV} is not set: the chaos agents need their ledger")
        self._ctx = ctx
        self._ledger = LedgerWriter(directory, ctx.run_id, ctx.epoch, ctx.peer_id)

    def record(self, kind: str, seq: int) -> None:
        ctx = self._ctx
        self._ledger.append(LedgerEntry(kind, ctx.run_id, ctx.epoch, ctx.peer_id, seq, _now_ms()))

    async def step(self, position: int, step_s: float) -> dict[str, Any]:
        ctx = self._ctx

        async def side_effect() -> dict[str, Any]:
            self.record(STEP_START, position)
            await asyncio.sleep(step_s)
            self.record(STEP_END, position)
            return {"seq": position, "peer": ctx.peer_id, "epoch": ctx.epoch}

        done: dict[str, Any] = await ctx.step(f"s{position}", side_effect)
        ctx.emit("step", {"seq": position, "epoch": ctx.epoch})
        return done

    async def run(self, body: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        self.record(ATTEMPT_START, -1)
        try:
            result = await body()
        except (Suspending, Released):
            self.record(ATTEMPT_SUSPEND, -1)
            raise
        else:
            self.record(ATTEMPT_END, -1)
            return {**result, "epoch": self._ctx.epoch, "peer": self._ctx.peer_id}
        finally:
            self._ledger.close()


@agent("chaos")
async def chaos_agent(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    count = int(input.get("steps", 5))
    step_s = float(input.get("step_s", 0.3))
    attempt = _Attempt(ctx)

    async def body() -> dict[str, Any]:
        return {"steps": [await attempt.step(seq, step_s) for seq in range(count)]}

    return await attempt.run(body)


@agent("chaos_sleep")
async def sleep_agent(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """``steps`` steps with a durable sleep of ``sleep_s`` before step ``sleep_at``."""
    count = int(input.get("steps", 3))
    step_s = float(input.get("step_s", 0.3))
    sleep_s = float(input.get("sleep_s", 3.0))
    sleep_at = int(input.get("sleep_at", 1))
    attempt = _Attempt(ctx)

    async def body() -> dict[str, Any]:
        done = []
        position = 0
        for seq in range(count):
            if seq == sleep_at:
                await ctx.sleep(sleep_s)
                position += 1
            done.append(await attempt.step(position, step_s))
            position += 1
        return {"steps": done}

    return await attempt.run(body)


@agent("chaos_signal")
async def signal_agent(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    count = int(input.get("signals", 3))
    attempt = _Attempt(ctx)

    async def body() -> dict[str, Any]:
        received = []
        for index in range(count):
            received.append(await ctx.wait_for_signal(SIGNAL_NAME))
            ctx.emit("signal", {"index": index, "epoch": ctx.epoch})
        return {"signals": received}

    return await attempt.run(body)


@agent("chaos_parent")
async def parent_agent(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """``children`` children of ``chaos`` (``child`` is their input), awaited
    together, then one step of its own."""
    count = int(input.get("children", 2))
    child: dict[str, Any] = dict(input.get("child") or {"steps": 2, "step_s": 0.2})
    step_s = float(input.get("step_s", 0.2))
    attempt = _Attempt(ctx)

    async def body() -> dict[str, Any]:
        results = await ctx.gather(*(ctx.spawn("chaos", child) for _ in range(count)))
        done = await attempt.step(count, step_s)
        return {"children": results, "steps": [done]}

    return await attempt.run(body)
