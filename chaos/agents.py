"""The workload's agent, loaded into every peer with ``MESH_AGENT_MODULES=chaos.agents``.

``chaos`` takes ``steps`` journaled steps of ``step_s`` seconds each and logs
every execution to the side-effect ledger (chaos.ledger) before and after the
step's side effect, so a step that ran twice shows up even if only one of its
runs could be checkpointed. Each step also emits an event, which gives the
checker a per-run, storage-ordered stream of epochs to spot stale writes in.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from raftmesh.chaos.ledger import (
    ATTEMPT_END,
    ATTEMPT_START,
    LEDGER_DIR_ENV,
    STEP_END,
    STEP_START,
    LedgerEntry,
    LedgerWriter,
)
from raftmesh.runner.context import RunContext
from raftmesh.runner.registry import agent


def _now_ms() -> int:
    return int(time.time() * 1000)


@agent("chaos")
async def chaos_agent(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    directory = os.environ.get(LEDGER_DIR_ENV)
    if not directory:
        raise RuntimeError(f"{LEDGER_DIR_ENV} is not set: the chaos agent needs its ledger")
    count = int(input.get("steps", 5))
    step_s = float(input.get("step_s", 0.3))
    ledger = LedgerWriter(directory, ctx.run_id, ctx.epoch, ctx.peer_id)

    def record(kind: str, seq: int) -> None:
        ledger.append(LedgerEntry(kind, ctx.run_id, ctx.epoch, ctx.peer_id, seq, _now_ms()))

    async def side_effect(seq: int) -> dict[str, Any]:
        record(STEP_START, seq)
        await asyncio.sleep(step_s)
        record(STEP_END, seq)
        return {"seq": seq, "peer": ctx.peer_id, "epoch": ctx.epoch}

    record(ATTEMPT_START, -1)
    try:
        done = []
        for seq in range(count):
            done.append(await ctx.step(f"s{seq}", side_effect, seq))
            ctx.emit("step", {"seq": seq, "epoch": ctx.epoch})
        record(ATTEMPT_END, -1)
        return {"steps": done, "epoch": ctx.epoch, "peer": ctx.peer_id}
    finally:
        ledger.close()
