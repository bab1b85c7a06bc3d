"""A database outage in the middle of a run is waited out, not a failure.

PostgreSQL is reached through a TCP proxy (the chaos harness's) that the test
switches to "refused" while the agent checkpoints steps and emits events, as a
database restart would. The attempt must succeed with every step and every
event stored exactly once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from raftmesh.chaos.proxy import REFUSED, UP
from raftmesh.consensus.spec import RunSpec
from raftmesh.runner.attempt import SUCCEEDED, Assignment, run_attempt
from raftmesh.runner.context import RunContext
from raftmesh.runner.registry import Registry

STEPS = 12


async def test_an_outage_during_steps_and_events_is_waited_out(proxied_pg):
    store, link, _ = proxied_pg
    registry = Registry()
    cut = asyncio.Event()

    async def checkpointing(ctx: RunContext, _: Any) -> int:
        for i in range(STEPS):
            await ctx.step(f"s{i}", lambda i=i: i)
            ctx.emit("progress", {"i": i})
            if i == 3:
                cut.set()
            await asyncio.sleep(0.1)
        return STEPS

    registry.add("checkpointing", checkpointing)

    async def outage() -> None:
        await cut.wait()
        link.set_state(REFUSED)
        await asyncio.sleep(1.5)
        link.set_state(UP)

    job = Assignment(run_id="run-1", epoch=1, attempt=1, spec=RunSpec("checkpointing"))
    clock = lambda: int(asyncio.get_running_loop().time() * 1000)  # noqa: E731
    outcome, _ = await asyncio.gather(
        run_attempt(job, peer_id="p", store=store, registry=registry, clock_ms=clock), outage()
    )
    status, error = outcome.status, outcome.error
    assert status == SUCCEEDED, f"the outage failed the attempt: {status} {error}"
    steps = await store.load_steps("run-1")
    assert [s.name for s in steps] == [f"s{i}" for i in range(STEPS)]
    events = [e for e in await store.read_events("run-1") if e.kind == "progress"]
    assert len(events) == STEPS, f"each event stored once, got {len(events)}"
