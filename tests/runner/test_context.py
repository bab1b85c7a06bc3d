"""The durable context against a real SQLite store: replay, determinism, timers, budgets.

Attempts run in this process through ``run_attempt``, exactly as a peer runs
them, with the epoch advanced by hand between attempts as the mesh would on a
failover.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from raftmesh.consensus.spec import RunSpec
from raftmesh.runner.attempt import FAILED, SUCCEEDED, Assignment, run_attempt
from raftmesh.runner.context import Limits, RunContext
from raftmesh.runner.payload import event_data, unpack
from raftmesh.runner.registry import Registry
from raftmesh.storage import Store


def job(agent: str, epoch: int, input: Any = None, **kw: Any) -> Assignment:
    return Assignment(
        run_id="run-1", epoch=epoch, attempt=epoch, spec=RunSpec(agent=agent, input=input, **kw)
    )


def clock() -> int:
    return int(time.time() * 1000)


async def attempt(store: Store, registry: Registry, j: Assignment) -> Any:
    return await run_attempt(j, peer_id="p", store=store, registry=registry, clock_ms=clock)


class Crash(Exception):
    pass


async def test_changed_step_order_on_replay_raises_nondeterminism(store):
    registry = Registry()
    order = ["plan", "search", "answer"]
    calls: list[str] = []

    async def agent(ctx: RunContext, input: Any) -> Any:
        for i, name in enumerate(order):
            await ctx.step(name, lambda n=name: calls.append(n) or n)
            if input == "crash" and i == 1:
                raise Crash("killed after two steps")
        return calls

    registry.add("planner", agent)
    first = await attempt(store, registry, job("planner", 1, "crash", max_attempts=3))
    assert first.status == "retry"
    order[:] = ["plan", "answer", "search"]  # a new deploy reorders the steps
    second = await attempt(store, registry, job("planner", 2, None, max_attempts=3))
    assert second.status == FAILED, "NonDeterminism fails the run, it is not retried"
    assert second.error.startswith("NonDeterminism: run run-1: step 1 is 'search' in the journal")
    assert "'answer'" in second.error
    assert calls == ["plan", "search"], "the mismatching step must not run"
    steps = await store.load_steps("run-1")
    assert [s.name for s in steps] == ["plan", "search"], "the journal is not corrupted"
    row = await store.get_run("run-1")
    assert row.status == FAILED


async def test_durable_sleep_and_checkpoint_survive_a_new_attempt(store):
    registry = Registry()
    ran: list[int] = []

    async def agent(ctx: RunContext, input: Any) -> Any:
        await ctx.step("before", lambda: ran.append(ctx.epoch) or ctx.epoch)
        ctx.state["seen"] = ctx.epoch
        await ctx.checkpoint()
        ctx.emit("slept?", {"epoch": ctx.epoch})
        await ctx.sleep(input["sleep_s"])
        if ctx.epoch == 1:
            raise Crash("owner died after the timer was set")
        return {"state": ctx.state, "after": await ctx.step("after", lambda: ctx.epoch)}

    registry.add("sleeper", agent)
    t0 = time.monotonic()
    first = await attempt(store, registry, job("sleeper", 1, {"sleep_s": 1.5}, max_attempts=2))
    assert first.status == "retry"
    assert time.monotonic() - t0 >= 1.5
    t1 = time.monotonic()
    second = await attempt(store, registry, job("sleeper", 2, {"sleep_s": 1.5}, max_attempts=2))
    resumed_s = time.monotonic() - t1
    assert second.status == SUCCEEDED
    row = await store.get_run("run-1")
    assert unpack(row.result) == {"state": {"seen": 1}, "after": 2}
    assert ran == [1], "the first step replayed instead of running again"
    assert resumed_s < 1.0, f"a served timer must not be slept again ({resumed_s:.2f}s)"
    names = [s.name for s in await store.load_steps("run-1")]
    assert names == ["before", "checkpoint", "sleep", "after"]
    events = await store.read_events("run-1")
    assert [(e.kind, event_data(e.data)) for e in events] == [("slept?", {"epoch": 1})], (
        "an event an earlier attempt stored is not stored again on replay"
    )


async def test_budget_is_enforced_and_recomputed_on_replay(store):
    registry = Registry()

    async def agent(ctx: RunContext, input: Any) -> Any:
        for i in range(input["calls"]):
            ctx.require(model_calls=1)
            used = await ctx.step(f"model-{i}", lambda: 40)
            ctx.charge(model_calls=1, tokens=used)
            if ctx.epoch == 1 and i == 1:
                raise Crash("after two calls")
        return ctx.spent

    registry.add("spender", agent)
    budget = {"model_calls": 3, "tokens": 1000}
    first = await attempt(
        store, registry, job("spender", 1, {"calls": 3}, budget=budget, max_attempts=3)
    )
    assert first.status == "retry"
    second = await attempt(
        store, registry, job("spender", 2, {"calls": 3}, budget=budget, max_attempts=3)
    )
    assert second.status == SUCCEEDED
    assert unpack((await store.get_run("run-1")).result) == {"model_calls": 3, "tokens": 120}


async def test_budget_exhausted_fails_the_run_without_retry(store):
    registry = Registry()

    async def agent(ctx: RunContext, input: Any) -> Any:
        for i in range(5):
            ctx.require(model_calls=1)
            await ctx.step(f"model-{i}", lambda: None)
            ctx.charge(model_calls=1)
        return "unreachable"

    registry.add("greedy", agent)
    out = await attempt(
        store, registry, job("greedy", 1, None, budget={"model_calls": 2}, max_attempts=5)
    )
    assert out.status == FAILED
    assert (
        out.error
        == "BudgetExhausted: run run-1: budget exhausted: needs 1 model_calls, 0 left of 2"
    )
    assert len(await store.load_steps("run-1")) == 2


async def test_concurrent_steps_keep_positions_across_replay(store):
    registry = Registry()

    async def agent(ctx: RunContext, input: Any) -> Any:
        async def slow(i: int) -> int:
            await asyncio.sleep(0.05 * (5 - i))  # later steps finish first
            return i

        got = await asyncio.gather(*(ctx.step(f"s{i}", slow, i) for i in range(5)))
        if ctx.epoch == 1:
            raise Crash("after the gather")
        return got

    registry.add("parallel", agent)
    assert (
        await attempt(store, registry, job("parallel", 1, None, max_attempts=2))
    ).status == "retry"
    assert (
        await attempt(store, registry, job("parallel", 2, None, max_attempts=2))
    ).status == SUCCEEDED
    steps = await store.load_steps("run-1")
    assert [(s.seq, s.name) for s in steps] == [(i, f"s{i}") for i in range(5)]
    assert unpack((await store.get_run("run-1")).result) == [0, 1, 2, 3, 4]


async def test_isolated_agent_uses_the_ctx_over_a_pipe_and_replays(store):
    """``durable`` in a subprocess: steps, sleep and emits go through the pipe to
    the real context, and a second attempt replays the journal there too."""
    from raftmesh.runner.registry import build_registry

    registry = build_registry(demo=True)
    spec = {"steps": 4, "step_seconds": 0.01, "sleep_after": 2, "sleep_seconds": 0.2}
    kw = {"isolation": "process", "memory_limit_mb": 1024}
    first = await attempt(store, registry, job("durable", 1, spec, **kw))
    assert first.status == SUCCEEDED
    result = unpack((await store.get_run("run-1")).result)
    assert [s["index"] for s in result["steps"]] == [0, 1, 2, 3]
    names = [s.name for s in await store.load_steps("run-1")]
    assert names == ["step-0", "step-1", "sleep", "step-2", "step-3"]
    events = await store.read_events("run-1")
    assert [event_data(e.data)["done"] for e in events] == [1, 2, 3, 4]


async def test_isolated_agent_past_its_memory_limit_fails_its_attempt(store):
    from raftmesh.runner.registry import build_registry

    registry = build_registry(demo=True)
    kw = {"isolation": "process", "memory_limit_mb": 300}
    out = await attempt(store, registry, job("hog", 1, {"mb": 600}, max_attempts=2, **kw))
    assert out.status == "retry", "an isolated crash is an ordinary failure, retried by policy"
    assert "MemoryError" in out.error and "300 MB" in out.error, out.error
    again = await attempt(store, registry, job("hog", 2, {"mb": 50}, max_attempts=2, **kw))
    assert again.status == SUCCEEDED
    result = unpack((await store.get_run("run-1")).result)
    import os

    assert result["allocated_mb"] == 50 and result["pid"] != os.getpid()


async def test_isolated_agent_is_held_to_its_budget_by_the_peer(store):
    from raftmesh.runner.registry import build_registry

    registry = build_registry(demo=True)
    spec = {"children": 0, "spend": {"model_calls": 6}}
    kw = {"isolation": "process", "budget": {"model_calls": 5}}
    out = await attempt(store, registry, job("fanout", 1, spec, max_attempts=3, **kw))
    assert out.status == FAILED, "a budget overrun is final, in a subprocess too"
    assert (
        out.error
        == "BudgetExhausted: run run-1: budget exhausted: needs 6 model_calls, 5 left of 5"
    )


async def test_a_run_past_its_event_limit_fails_and_a_new_attempt_counts_the_stored_ones(store):
    registry = Registry()

    async def chatty(ctx: RunContext, input: Any) -> Any:
        for i in range(input):
            await ctx.emit("progress", {"i": i})
        return "done"

    registry.add("chatty", chatty)
    limits = Limits(max_events=5)

    async def go(j: Assignment) -> Any:
        return await run_attempt(
            j, peer_id="p", store=store, registry=registry, clock_ms=clock, limits=limits
        )

    within = await go(Assignment(run_id="ok", epoch=1, attempt=1, spec=RunSpec("chatty", 5)))
    assert within.status == SUCCEEDED
    past = await go(job("chatty", 1, 50, max_attempts=3))
    assert past.status == FAILED, "the limit fails the run; another attempt cannot fix it"
    assert past.error.startswith("EventLimit: run run-1: event limit reached")
    assert "max_events_per_run" in past.error
    assert len(await store.read_events("run-1", after_seq=0)) == 5


async def test_streamed_tokens_are_coalesced_into_few_events(store):
    from raftmesh.runner.agents.chat import TOKEN_BATCH_CHARS, TokenBatch

    ctx = RunContext(
        run_id="run-1", epoch=1, attempt=1, peer_id="p", store=store, journal=[], clock_ms=clock
    )
    await store.claim(job("x", 1).row(), 1, "p", clock())
    batch = TokenBatch(ctx, turn=0)
    for _ in range(1000):
        batch.add("ab")
    batch.flush()
    await ctx.drain()
    events = await store.read_events("run-1", after_seq=0)
    text = "".join(event_data(e.data)["text"] for e in events)
    assert text == "ab" * 1000
    assert len(events) <= 2000 // TOKEN_BATCH_CHARS + 1
