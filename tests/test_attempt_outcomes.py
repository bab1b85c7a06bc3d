"""One attempt on a real store (SQLite; PostgreSQL too for crashes): cancel,
timeout, failure and crash outcomes, and the state machine's retry policy for
failures and lost owners."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvloop

from raftmesh.consensus import commands as c
from raftmesh.consensus.spec import RunSpec
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.status import RunStatus
from raftmesh.runner.attempt import CANCELLED, RETRY, Assignment, Outcome, run_attempt
from raftmesh.runner.context import RunContext
from raftmesh.runner.payload import pack
from raftmesh.runner.registry import Registry
from raftmesh.storage import Store, open_store

PG_URL = os.environ.get("RAFTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgres"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    schema = f"attempt_{uuid.uuid4().hex[:12]}"
    url = (
        f"sqlite:///{tmp_path / 'runs.db'}"
        if request.param == "sqlite"
        else f"{PG_URL}?schema={schema}"
    )
    s = open_store(url)
    await s.open()
    yield s
    await s.close()
    if request.param == "postgres":
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def job(
    agent: str, timeout_s: float | None = None, epoch: int = 1, priority: int = 0, **kw: Any
) -> Assignment:
    return Assignment(
        run_id="r1",
        epoch=epoch,
        attempt=1,
        spec=RunSpec(agent=agent, priority=priority, timeout_s=timeout_s, max_attempts=3),
        submitted_at_ms=1,
        **kw,
    )


async def attempt(store: Store, registry: Registry, j: Assignment, **kw: Any) -> Outcome:
    return await run_attempt(
        j, peer_id="p1", store=store, registry=registry, clock_ms=lambda: 1000, **kw
    )


async def test_cancel_reaches_the_agent_as_cancelled_error_and_is_stored(store: Store) -> None:
    seen: dict[str, Any] = {}
    started = asyncio.Event()

    async def waits(ctx: RunContext, _: Any) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen["cancelled"] = ctx.cancelled
            raise

    registry = Registry()
    registry.add("waits", waits)
    contexts: list[RunContext | None] = []
    task = asyncio.create_task(attempt(store, registry, job("waits"), on_context=contexts.append))
    await asyncio.wait_for(started.wait(), 5)
    ctx = contexts[0]
    assert ctx is not None and not ctx.cancelled
    ctx.cancel()
    outcome = await asyncio.wait_for(task, 1)
    assert outcome == Outcome(CANCELLED, "cancelled by request")
    assert seen == {"cancelled": True}
    assert contexts[-1] is None
    row = await store.get_run("r1")
    assert row is not None and (row.status, row.error) == ("cancelled", "cancelled by request")


async def test_a_run_cancelled_before_it_starts_never_runs_its_agent(store: Store) -> None:
    calls = []

    async def records(ctx: RunContext, _: Any) -> None:
        calls.append(1)

    registry = Registry()
    registry.add("records", records)
    outcome = await attempt(store, registry, job("records", cancel_requested=True))
    assert outcome.status == CANCELLED and calls == []


async def test_timeouts_and_errors_are_left_to_the_mesh_unstored(store: Store) -> None:
    async def slow(ctx: RunContext, _: Any) -> None:
        await asyncio.sleep(60)

    async def broken(ctx: RunContext, _: Any) -> None:
        raise ValueError("nope")

    registry = Registry()
    registry.add("slow", slow)
    registry.add("broken", broken)
    timed = await attempt(store, registry, job("slow", timeout_s=0.05))
    assert (timed.status, timed.kind) == (RETRY, "timeout")
    failed = await attempt(store, registry, job("broken", epoch=2))
    assert (failed.status, failed.kind, failed.error) == (RETRY, "error", "ValueError: nope")
    row = await store.get_run("r1")
    assert row is not None and row.status == "running" and row.result is None


def _running(policy: dict[str, Any], max_attempts: int) -> MeshState:
    state = MeshState()
    for cmd in (
        c.Configure("c0", 1, {}, None, {}, None, policy),
        c.PeerUp("c1", 1, "p", "i1", "r", "h", 2, {}),
        c.Submit("c2", 1, [{"id": "r", "agent": "echo", "max_attempts": max_attempts}]),
        c.Assign("c3", 1, 1, [("r", "p", 1)]),
    ):
        assert state.apply(cmd).ok
    return state


def test_timeouts_end_the_run_at_once_unless_configured_to_retry() -> None:
    state = _running({"retry_timeouts": False}, max_attempts=3)
    assert state.apply(c.Fail("c4", 2, "r", 1, "timeout", "slow")).retry is False
    assert (state.runs["r"].status, state.runs["r"].outcome) == (RunStatus.SETTLING, "timed_out")
    state = _running({"retry_timeouts": True}, max_attempts=3)
    assert state.apply(c.Fail("c4", 2, "r", 1, "timeout", "slow")).retry is True


def test_lost_owners_use_attempts_only_when_configured() -> None:
    state = _running({"count_lost_owner": False}, max_attempts=1)
    assert state.apply(c.PeerDown("c4", 2, "p", "i1")).ok
    assert (state.runs["r"].status, state.runs["r"].losses) == (RunStatus.QUEUED, 1)
    state = _running({"count_lost_owner": True}, max_attempts=1)
    assert state.apply(c.PeerDown("c4", 2, "p", "i1")).ok
    run = state.runs["r"]
    assert (run.status, run.outcome, run.last_error) == (
        RunStatus.SETTLING,
        "failed",
        "owner lost 1 times",
    )


async def test_attempts_whose_machinery_crashes_end_as_a_dead_letter(any_store: Store) -> None:
    """A priority the storage column cannot hold (2**63 on SQLite, 2**31 on
    PostgreSQL's INTEGER) makes every claim raise. Each such attempt is a
    failed attempt ("error", with the crash as its message), so after
    max_attempts the run settles as failed instead of being reassigned forever."""
    too_big = 2**63 if "sqlite" in type(any_store).__name__.lower() else 2**31
    registry = Registry()
    registry.add("echo", lambda ctx, value: value)
    state = _running({"backoff_base_ms": 0, "backoff_max_ms": 0}, max_attempts=3)
    for n in range(1, 4):
        run = state.runs["r"]
        outcome = await attempt(any_store, registry, job("echo", epoch=run.epoch, priority=too_big))
        assert (outcome.status, outcome.kind) == (RETRY, "error"), outcome
        assert outcome.error is not None and outcome.error.startswith("attempt crashed: ")
        result = state.apply(c.Fail(f"f{n}", 10 * n, "r", run.epoch, outcome.kind, outcome.error))
        assert result.ok and result.retry is (n < 3), (n, result)
        if n < 3:
            assert state.apply(c.Assign(f"a{n}", 10 * n + 1, 1, [("r", "p", run.epoch + 1)])).ok
    run = state.runs["r"]
    assert (run.status, run.outcome, run.errors) == (RunStatus.SETTLING, "failed", 3)
    assert run.last_error == outcome.error


def test_an_attempt_that_ends_without_its_agent_cancels_the_agent(tmp_path: Path) -> None:
    """uvloop (the peers' loop) refuses a NaN timeout with ValueError once the
    agent task exists. The attempt fails, and its agent must not live on."""

    async def scenario() -> tuple[Outcome, list[int], list[asyncio.Task[Any]]]:
        s = open_store(f"sqlite:///{tmp_path / 'runs.db'}")
        await s.open()
        try:
            calls: list[int] = []

            async def waits(ctx: RunContext, _: Any) -> None:
                calls.append(1)
                await asyncio.sleep(60)

            registry = Registry()
            registry.add("waits", waits)
            outcome = await attempt(s, registry, job("waits", timeout_s=float("nan")))
            await asyncio.sleep(0.1)
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            return outcome, calls, left
        finally:
            await s.close()

    outcome, calls, left = uvloop.run(scenario())
    assert (outcome.status, outcome.kind) == (RETRY, "error"), outcome
    assert left == [] and calls == [], "the agent task was cancelled, not left running"


class _CountingStore:
    """The real store, with its journal and event reads counted."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.reads: list[str] = []

    async def load_steps(self, run_id: str) -> Any:
        self.reads.append("steps")
        return await self._inner.load_steps(run_id)

    async def read_events(self, run_id: str, after_seq: int = 0, limit: int = 1000) -> Any:
        self.reads.append("events")
        return await self._inner.read_events(run_id, after_seq, limit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_a_first_attempt_reads_no_journal_and_a_later_one_replays_it(
    any_store: Store,
) -> None:
    """Epoch 1 is the first claim storage ever sees, so nothing can be
    checkpointed yet: the attempt reads neither steps nor events. An attempt
    under a later epoch reads both and replays what an earlier one stored."""
    ran: list[str] = []

    async def planner(ctx: RunContext, _: Any) -> Any:
        async def plan() -> str:
            ran.append("plan")
            return "the plan"

        return await ctx.step("plan", plan)

    registry = Registry()
    registry.add("planner", planner)
    counting = _CountingStore(any_store)
    first = await attempt(counting, registry, job("planner"))  # type: ignore[arg-type]
    assert first.status == RunStatus.SUCCEEDED and ran == ["plan"]
    assert counting.reads == []

    other = Assignment("r2", 1, 1, RunSpec(agent="planner"), submitted_at_ms=1)
    await any_store.claim(other.row(), 1, "p0", 1)
    await any_store.put_step("r2", 1, 0, "plan", pack("the plan"), "p0", 2)
    resumed = dataclasses.replace(other, epoch=2, attempt=2)
    second = await attempt(counting, registry, resumed)  # type: ignore[arg-type]
    assert second.status == RunStatus.SUCCEEDED
    assert ran == ["plan"], "the checkpointed step is not run again"
    assert counting.reads == ["steps", "events"]
