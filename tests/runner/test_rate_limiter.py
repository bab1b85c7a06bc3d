"""A peer's side of the mesh-wide limits (runner/rate_limits.py) on the real
event loop: calls wait without a lease, go in queue order once one arrives,
hold a concurrent call for the ``async with`` block, and report what they want
for the next heartbeat. ``ctx.limit`` names only configured limits."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from raftmesh.consensus.spec import RunSpec
from raftmesh.runner.attempt import FAILED, SUCCEEDED, Assignment, run_attempt
from raftmesh.runner.context import RunContext
from raftmesh.runner.rate_limits import Limiter, RateLimit
from raftmesh.runner.registry import Registry
from raftmesh.storage import Store

LIMITS = {"api": RateLimit(rpm=600), "local": RateLimit(concurrent=2)}


async def settle() -> None:
    """Let every task that can run, run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_call_without_a_lease_waits_until_one_arrives():
    waits: list[tuple[str, float]] = []
    limiter = Limiter(LIMITS, on_wait=lambda name, s: waits.append((name, s)))
    call = asyncio.create_task(limiter.limit("api").__aenter__())
    await asyncio.sleep(0.2)
    assert not call.done(), "no lease: no capacity"
    assert limiter.demand()["api"] == {"waiting": 1, "in_use": 0}
    limiter.renew({"api": {"requests": [1.0, 10.0]}}, time.monotonic(), 5.0)
    await asyncio.wait_for(call, 5)
    assert waits and waits[0][0] == "api" and waits[0][1] >= 0.2


async def test_a_fresh_lease_starts_empty_and_refills_at_its_rate():
    limiter = Limiter(LIMITS)
    limiter.renew({"api": {"requests": [2.0, 20.0]}}, time.monotonic(), 5.0)
    assert limiter.try_take("api", 0) > 0, "nothing to spend before any refill"
    started = time.monotonic()
    for _ in range(4):
        await limiter.limit("api")
    # 4 requests at 20/s from empty: at least 0.15 s of refill (burst 2 after 0.1 s).
    assert time.monotonic() - started >= 0.14


async def test_an_expired_lease_admits_nothing_more():
    limiter = Limiter(LIMITS)
    limiter.renew({"api": {"requests": [5.0, 100.0]}}, time.monotonic(), 0.3)
    await asyncio.sleep(0.35)
    assert limiter.try_take("api", 0) == float("inf")


async def test_concurrent_calls_hold_a_slot_and_go_in_queue_order():
    limiter = Limiter(LIMITS)
    limiter.renew({"local": {"concurrent": 2}}, time.monotonic(), 30.0)
    order: list[int] = []
    release = asyncio.Event()

    async def call(i: int) -> None:
        async with limiter.limit("local"):
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(call(i)) for i in range(4)]
    await settle()
    assert order == [0, 1]
    assert limiter.demand()["local"] == {"waiting": 2, "in_use": 2}
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2, 3]
    assert limiter.demand()["local"] == {"waiting": 0, "in_use": 0}


async def test_a_cancelled_waiter_leaves_the_queue_to_the_next():
    limiter = Limiter(LIMITS)
    limiter.renew({"local": {"concurrent": 1}}, time.monotonic(), 30.0)
    held = limiter.limit("local")
    await held.__aenter__()
    first = asyncio.create_task(limiter.limit("local").__aenter__())
    second = asyncio.create_task(limiter.limit("local").__aenter__())
    await settle()
    first.cancel()
    await settle()
    held.release()
    await asyncio.wait_for(second, 5)
    assert limiter.demand()["local"] == {"waiting": 0, "in_use": 1}


async def test_await_is_refused_for_a_concurrency_count():
    limiter = Limiter(LIMITS)
    with pytest.raises(TypeError, match='use "async with ctx.limit'):
        await limiter.limit("local")


# -- ctx.limit in a run ---------------------------------------------------------


async def run(store: Store, agent: Any, limiter: Limiter) -> Any:
    registry = Registry()
    registry.add("limited", agent)
    job = Assignment(run_id="run-1", epoch=1, attempt=1, spec=RunSpec(agent="limited"))
    return await run_attempt(
        job,
        peer_id="p",
        store=store,
        registry=registry,
        clock_ms=lambda: int(time.time() * 1000),
        rate_limiter=limiter,
    )


async def test_ctx_limit_waits_for_the_peers_lease(store):
    limiter = Limiter(LIMITS)
    limiter.renew({"local": {"concurrent": 1}}, time.monotonic(), 30.0)

    async def agent(ctx: RunContext, input: Any) -> str:
        async with ctx.limit("local"):
            return "called"

    outcome = await run(store, agent, limiter)
    assert outcome.status == SUCCEEDED, outcome


async def test_ctx_limit_of_an_unknown_name_fails_the_run_naming_the_configured_ones(store):
    async def agent(ctx: RunContext, input: Any) -> None:
        await ctx.limit("elsewhere")

    outcome = await run(store, agent, Limiter(LIMITS))
    assert outcome.status == FAILED
    assert "no rate limit named 'elsewhere'" in (outcome.error or "")
    assert "configured: api, local" in (outcome.error or "")
