"""Waits that end the attempt (issue 11), against a real SQLite store.

Attempts run through ``run_attempt`` as a peer runs them; between attempts
the test does what the mesh would (a signal stored, a child finished, the
epoch advanced) and checks that the next attempt replays to the waiting call,
which then returns, without running a checkpointed step again.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from raftmesh.consensus.spec import RunSpec
from raftmesh.consensus.waits import checked_wait
from raftmesh.runner.attempt import (
    CANCELLED,
    RELEASED,
    SUCCEEDED,
    SUSPENDED,
    Assignment,
    Outcome,
    run_attempt,
)
from raftmesh.runner.context import RunContext, SignalTimeout
from raftmesh.runner.payload import pack, unpack
from raftmesh.runner.registry import Registry, build_registry
from raftmesh.storage import RunRow, Store

E2E = Path(__file__).parents[1] / "e2e"


def clock() -> int:
    return int(time.time() * 1000)


class Mesh:
    """What the context asks of the mesh to start children: their rows, here."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.children: list[str] = []

    async def spawn(self, spec: dict[str, Any]) -> str:
        child_id = f"child-{spec['idempotency_key'].rsplit('/', 1)[-1]}"
        if child_id not in self.children:
            self.children.append(child_id)
            row = RunRow(child_id, RunSpec(agent=spec["agent"], input=pack(spec["input"])))
            await self.store.record_runs([row])
        return child_id

    async def finish(self, child_id: str, result: Any, status: str = SUCCEEDED) -> None:
        row = RunRow(child_id, RunSpec(agent="echo", input=pack(None)))
        await self.store.claim(row, 1, "p", clock())
        payload = pack(result) if status == SUCCEEDED else None
        await self.store.put_result(child_id, 1, status, payload, "boom", clock())


async def attempt(
    store: Store,
    registry: Registry,
    agent: str,
    epoch: int,
    input: Any = None,
    mesh: Mesh | None = None,
    **spec: Any,
) -> Outcome:
    job = Assignment("run-1", epoch, epoch, RunSpec(agent=agent, input=input, **spec))
    return await run_attempt(
        job,
        peer_id="p",
        store=store,
        registry=registry,
        clock_ms=clock,
        mesh=mesh,
        suspend_after_s=1.0,
    )


def witnessing(ran: list[tuple[str, int]]) -> Any:
    def record(name: str, epoch: int) -> str:
        ran.append((name, epoch))
        return name

    return record


async def test_a_long_sleep_suspends_and_the_woken_run_sleeps_no_more(store: Store) -> None:
    registry = Registry()
    ran: list[tuple[str, int]] = []

    async def agent(ctx: RunContext, input: Any) -> Any:
        await ctx.step("before", witnessing(ran), "before", ctx.epoch)
        ctx.emit("before-sleep")
        await ctx.sleep(input)
        return await ctx.step("after", witnessing(ran), "after", ctx.epoch)

    registry.add("sleeper", agent)
    began = clock()
    first = await attempt(store, registry, "sleeper", 1, 1.5)
    assert first.status == SUSPENDED
    assert first.wait is not None and first.wait["kind"] == "timer"
    assert checked_wait(first.wait)["due_ms"] == first.wait["due_ms"], "apply accepts the wait"
    assert began + 1500 <= first.wait["due_ms"] <= clock() + 1500
    assert [e.kind for e in await store.read_events("run-1")] == ["before-sleep"], (
        "the events emitted before the wait are stored before the attempt ends"
    )
    await asyncio.sleep(max(0, first.wait["due_ms"] - clock()) / 1000)
    t = time.monotonic()
    second = await attempt(store, registry, "sleeper", 2, 1.5)
    assert second.status == SUCCEEDED
    assert time.monotonic() - t < 1.0, "the woken run does not sleep again"
    assert ran == [("before", 1), ("after", 2)]
    assert len(await store.read_events("run-1")) == 1


async def test_a_short_sleep_stays_in_memory(store: Store) -> None:
    registry = Registry()

    async def agent(ctx: RunContext, input: Any) -> Any:
        await ctx.sleep(0.3)
        return "done"

    registry.add("napper", agent)
    assert (await attempt(store, registry, "napper", 1)).status == SUCCEEDED


async def test_a_signal_wait_suspends_until_the_signal_is_stored_and_replays_it(
    store: Store,
) -> None:
    registry = Registry()
    ran: list[tuple[str, int]] = []

    async def agent(ctx: RunContext, input: Any) -> Any:
        await ctx.step("before", witnessing(ran), "before", ctx.epoch)
        decision = await ctx.wait_for_signal("decision")
        await ctx.step("after", witnessing(ran), "after", ctx.epoch)
        if ctx.epoch == 2:
            raise RuntimeError("the owner dies after the signal was taken")
        return decision

    registry.add("approver", agent)
    first = await attempt(store, registry, "approver", 1, max_attempts=3)
    assert (first.status, first.wait) == (
        SUSPENDED,
        {"kind": "signal", "signal": "decision", "index": 0, "due_ms": None},
    )
    await store.put_signal("run-1", "decision", pack({"approve": True}), None, clock())
    await store.put_signal("run-1", "decision", pack("second"), None, clock())
    assert (await attempt(store, registry, "approver", 2, max_attempts=3)).status == "retry"
    third = await attempt(store, registry, "approver", 3, max_attempts=3)
    assert third.status == SUCCEEDED
    assert unpack((await store.get_run("run-1")).result) == {"approve": True}, (
        "the replay returns the signal the first delivery journaled, not the next one"
    )
    assert ran == [("before", 1), ("after", 2)]


async def test_signals_already_stored_are_taken_at_once_in_order(store: Store) -> None:
    """A signal sent before the wait is kept; two to one name arrive in order;
    a timed-out wait consumes none."""
    registry = Registry()

    async def agent(ctx: RunContext, input: Any) -> Any:
        got = [await ctx.wait_for_signal("go"), await ctx.wait_for_signal("go")]
        try:
            await ctx.wait_for_signal("late", timeout_s=0.2)
        except SignalTimeout as exc:
            got.append(str(exc))
        got.append(await ctx.wait_for_signal("late", timeout_s=0.5))
        return got

    registry.add("reader", agent)
    for data in ("a", "b"):
        await store.put_signal("run-1", "go", pack(data), None, clock())

    async def send_late() -> None:
        await asyncio.sleep(0.4)
        await store.put_signal("run-1", "late", pack("c"), None, clock())

    sender = asyncio.create_task(send_late())
    out = await attempt(store, registry, "reader", 1)
    await sender
    assert out.status == SUCCEEDED, out
    assert unpack((await store.get_run("run-1")).result) == [
        "a",
        "b",
        "no signal 'late' within 0.2s",
        "c",
    ]


async def test_a_long_signal_timeout_suspends_and_the_woken_run_times_out(store: Store) -> None:
    registry = Registry()

    async def agent(ctx: RunContext, input: Any) -> Any:
        try:
            return await ctx.wait_for_signal("go", timeout_s=1.2)
        except SignalTimeout:
            return "timed out"

    registry.add("impatient", agent)
    first = await attempt(store, registry, "impatient", 1)
    assert first.status == SUSPENDED and first.wait is not None
    assert first.wait["kind"] == "signal" and first.wait["due_ms"] is not None
    await asyncio.sleep(max(0, first.wait["due_ms"] - clock()) / 1000)
    assert (await attempt(store, registry, "impatient", 2)).status == SUCCEEDED
    assert unpack((await store.get_run("run-1")).result) == "timed out"
    # the timeout is journaled: a signal stored now changes no replay
    await store.put_signal("run-1", "go", pack("late"), None, clock())
    names = [s.name for s in await store.load_steps("run-1")]
    assert names == ["signal-due:go", "signal:go"]


async def test_an_agent_catching_exception_cannot_swallow_the_suspension(store: Store) -> None:
    registry = Registry()

    async def agent(ctx: RunContext, input: Any) -> Any:
        try:
            await ctx.wait_for_signal("go")
        except Exception:
            return "swallowed"
        return "delivered"

    registry.add("greedy", agent)
    assert (await attempt(store, registry, "greedy", 1)).status == SUSPENDED


async def test_gather_of_running_children_suspends_once_for_all_of_them(store: Store) -> None:
    registry = Registry()
    mesh = Mesh(store)

    async def agent(ctx: RunContext, input: Any) -> Any:
        kids = [ctx.spawn("echo", i) for i in range(3)]
        first = await kids[0]
        rest = await ctx.gather(*kids[1:])
        return [first, *rest]

    registry.add("parent", agent)
    out = await attempt(store, registry, "parent", 1, mesh=mesh)
    assert (out.status, out.wait) == (SUSPENDED, {"kind": "children", "children": ["child-0"]})
    await mesh.finish("child-0", "zero")
    out = await attempt(store, registry, "parent", 2, mesh=mesh)
    assert (out.status, out.wait) == (
        SUSPENDED,
        {"kind": "children", "children": ["child-1", "child-2"]},
    )
    await mesh.finish("child-1", "one")
    out = await attempt(store, registry, "parent", 3, mesh=mesh)
    assert out.wait == {"kind": "children", "children": ["child-2"]}
    await mesh.finish("child-2", "two")
    out = await attempt(store, registry, "parent", 4, mesh=mesh)
    assert out.status == SUCCEEDED
    assert unpack((await store.get_run("run-1")).result) == ["zero", "one", "two"]
    assert mesh.children == ["child-0", "child-1", "child-2"], "no child was started twice"


async def test_a_cancelled_run_ends_cancelled_instead_of_waiting(store: Store) -> None:
    registry = Registry()

    async def agent(ctx: RunContext, input: Any) -> Any:
        await ctx.wait_for_signal("go")

    registry.add("waiter", agent)
    job = Assignment("run-1", 1, 1, RunSpec(agent="waiter"), cancel_requested=True)
    out = await run_attempt(
        job, peer_id="p", store=store, registry=registry, clock_ms=clock, suspend_after_s=1.0
    )
    assert out.status == CANCELLED


async def test_an_isolated_agent_suspends_and_resumes_over_its_pipe(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """isolation=process supports suspension: the wait ends the child process,
    the next attempt replays in a new one and gets the signal's data."""
    isolated_agents(monkeypatch)
    registry = build_registry(("probe_agents",))
    log = tmp_path / "witness.log"
    spec = {"log": str(log), "waits": [{"signal": "go"}, {"sleep": 1.2}]}
    kw = {"isolation": "process", "memory_limit_mb": 1024}
    first = await attempt(store, registry, "probe_wait", 1, spec, **kw)
    assert first.status == SUSPENDED and first.wait is not None
    assert first.wait["kind"] == "signal", first
    await store.put_signal("run-1", "go", pack({"ok": 1}), None, clock())
    second = await attempt(store, registry, "probe_wait", 2, spec, **kw)
    assert second.status == SUSPENDED and second.wait is not None
    assert second.wait["kind"] == "timer", second
    await asyncio.sleep(max(0, second.wait["due_ms"] - clock()) / 1000)
    third = await attempt(store, registry, "probe_wait", 3, spec, **kw)
    assert third.status == SUCCEEDED, third
    assert unpack((await store.get_run("run-1")).result) == {"got": [{"ok": 1}, "slept"]}
    lines = log.read_text().split()
    starts = [lines[i + 1] for i in range(0, len(lines), 5) if lines[i + 4] == "start"]
    assert starts == ["0", "1", "2"], "no checkpointed step ran twice"


async def test_an_isolated_gather_waits_for_all_children_at_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolated_agents(monkeypatch)
    mesh = Mesh(store)
    registry = build_registry(("probe_agents",))
    spec = {"depth": 1, "fanout": 2}
    kw = {"isolation": "process", "memory_limit_mb": 1024}
    first = await attempt(store, registry, "probe_tree", 1, spec, mesh=mesh, **kw)
    assert (first.status, first.wait) == (
        SUSPENDED,
        {"kind": "children", "children": ["child-0", "child-1"]},
    )
    for child in mesh.children:
        await mesh.finish(child, {"leaves": 1})
    second = await attempt(store, registry, "probe_tree", 2, spec, mesh=mesh, **kw)
    assert second.status == SUCCEEDED, second
    assert unpack((await store.get_run("run-1")).result) == {"leaves": 2}


async def test_an_isolated_agent_is_released_at_its_next_step_boundary(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a pause (or a drain with release) asks of an isolated run as of a
    task: the step in flight is finished and checkpointed, the next is not
    started, and the next attempt starts no step twice."""
    isolated_agents(monkeypatch)
    registry = build_registry(("probe_agents",))
    log = tmp_path / "witness.log"
    spec = RunSpec(
        agent="probe_steps",
        input={"steps": 4, "step_seconds": 0.3, "log": str(log)},
        isolation="process",
        memory_limit_mb=1024,
    )
    release = asyncio.Event()

    async def run(epoch: int, release: asyncio.Event | None = None) -> Outcome:
        job = Assignment("run-1", epoch, epoch, spec)
        return await run_attempt(
            job, peer_id="p", store=store, registry=registry, clock_ms=clock, release=release
        )

    first = asyncio.create_task(run(1, release))
    for _ in range(1500):  # up to 30 s for the first step's checkpoint: released mid-run
        if await store.load_steps("run-1"):
            break
        await asyncio.sleep(0.02)
    release.set()
    out = await asyncio.wait_for(first, 30)
    assert out.status == RELEASED, out
    done = len(await store.load_steps("run-1"))
    assert 1 <= done < 4
    assert (await run(2)).status == SUCCEEDED
    lines = log.read_text().split()
    starts = [lines[i + 1] for i in range(0, len(lines), 5) if lines[i + 4] == "start"]
    assert starts == ["0", "1", "2", "3"], "no checkpointed step ran twice"
    ends = [lines[i + 1] for i in range(0, len(lines), 5) if lines[i + 4] == "end"]
    assert ends == starts, "the step in flight at the release was finished"


def isolated_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    """probe_agents importable here and in the isolated child process."""
    paths = [str(E2E), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch.syspath_prepend(str(E2E))
