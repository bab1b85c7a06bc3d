"""Agents loaded into test peers (MESH_AGENT_MODULES=probe_agents).

``probe_steps`` is ``steps`` with a witness: every time a step's function
starts or ends it appends a line to a file, outside the mesh's storage, so a
test sees a step that ran twice even if only one result was checkpointed.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

try:
    from raftmesh.runner.context import ChildFailed, RunContext
    from raftmesh.runner.registry import agent
except ImportError:
    # The release before the raftmesh namespace (tests/e2e/test_upgrade.py
    # runs peers of it) installs its packages at the top level.
    from runner.context import ChildFailed, RunContext  # type: ignore[no-redef]  # noqa: TID251
    from runner.registry import agent  # type: ignore[no-redef]  # noqa: TID251


def _witness(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@agent("probe_steps")
async def probe_steps(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    count = int(input["steps"])
    step_s = float(input["step_seconds"])
    path = str(input["log"])

    async def one(index: int) -> dict[str, Any]:
        _witness(path, f"{ctx.run_id} {index} {ctx.peer_id} {ctx.epoch} start")
        await asyncio.sleep(step_s)
        _witness(path, f"{ctx.run_id} {index} {ctx.peer_id} {ctx.epoch} end")
        return {"index": index, "peer": ctx.peer_id, "epoch": ctx.epoch}

    done = [await ctx.step(f"step-{i}", one, i) for i in range(count)]
    return {"steps": done}


def read_witness(path: str) -> list[tuple[str, int, str, int, str]]:
    """(run id, step index, peer, epoch, "start"|"end") per line."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        run_id, index, peer, epoch, what = line.split()
        out.append((run_id, int(index), peer, int(epoch), what))
    return out


@agent("probe_env")
async def probe_env(ctx: RunContext, input: Any) -> dict[str, Any]:
    """The environment variable names the agent sees, and its process id."""
    return {"names": sorted(os.environ), "pid": os.getpid()}


@agent("probe_limits")
async def probe_limits(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """Fails while the file ``input["fail_while"]`` exists; then reports where
    it ran: its process id and its address-space limit."""
    import resource

    if _exists(str(input["fail_while"])):
        raise RuntimeError("asked to fail while the file exists")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return {"pid": os.getpid(), "rlimit_as": soft}


def _exists(path: str) -> bool:
    return os.path.exists(path)


@agent("probe_wait")
async def probe_wait(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """A witnessed step, then the waits ``input["waits"]`` names in order
    (``{"signal": NAME, "timeout_s"?: s}`` or ``{"sleep": s}``), each followed by
    a witnessed step: the witness file shows a checkpointed step that ran
    again after a suspension or a restart. Returns what each wait gave."""
    path = str(input["log"])

    async def witnessed(index: int) -> int:
        _witness(path, f"{ctx.run_id} {index} {ctx.peer_id} {ctx.epoch} start")
        _witness(path, f"{ctx.run_id} {index} {ctx.peer_id} {ctx.epoch} end")
        return index

    got: list[Any] = []
    await ctx.step("step-0", witnessed, 0)
    for i, wait in enumerate(input["waits"], start=1):
        if "sleep" in wait:
            await ctx.sleep(float(wait["sleep"]))
            got.append("slept")
        else:
            try:
                got.append(await ctx.wait_for_signal(wait["signal"], wait.get("timeout_s")))
            except Exception as exc:  # SignalTimeout; Suspending passes through
                got.append(type(exc).__name__)
        await ctx.step(f"step-{i}", witnessed, i)
    return {"got": got}


@agent("probe_tree")
async def probe_tree(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """A tree of ``fanout`` children per level, ``depth`` levels deep, each
    parent waiting for all its children with ``ctx.gather``: the leaves count."""
    depth, fanout = int(input["depth"]), int(input["fanout"])
    if depth == 0:
        return {"leaves": 1}
    child = {"depth": depth - 1, "fanout": fanout}
    results = await ctx.gather(*(ctx.spawn("probe_tree", child) for _ in range(fanout)))
    return {"leaves": sum(r["leaves"] for r in results)}


@agent("probe_fanout")
async def probe_fanout(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """``probe_tree`` whose leaves do ``leaf_steps`` steps of ``step_seconds``
    each: every node reports its depth below it and what its subtree did, so
    each node's result can be checked on its own."""
    depth, fanout = int(input["depth"]), int(input["fanout"])
    if depth == 0:
        for i in range(int(input["leaf_steps"])):
            await ctx.step(f"leaf-{i}", asyncio.sleep, float(input["step_seconds"]))
        return {"depth": 0, "leaves": 1, "steps": int(input["leaf_steps"])}
    child = {**input, "depth": depth - 1}
    results = await ctx.gather(*(ctx.spawn("probe_fanout", child) for _ in range(fanout)))
    return {
        "depth": depth,
        "leaves": sum(r["leaves"] for r in results),
        "steps": sum(r["steps"] for r in results),
    }


@agent("probe_fail")
async def probe_fail(ctx: RunContext, input: dict[str, Any]) -> None:
    raise RuntimeError(str(input["message"]))


@agent("probe_failing_child")
async def probe_failing_child(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """Waits for a child that fails and one that succeeds; with ``catch`` it
    returns the ChildFailed it got, without it the failure ends this run."""
    failing = ctx.spawn("probe_fail", {"message": input["message"]})
    fine = ctx.spawn("probe_fanout", {"depth": 0, "fanout": 0, "leaf_steps": 1, "step_seconds": 0})
    try:
        await ctx.gather(failing, fine)
    except ChildFailed as exc:
        if not input["catch"]:
            raise
        return {"child_id": exc.child_id, "status": exc.status, "error": exc.error}
    return {"child_id": None}


def wall_ms() -> int:
    return int(time.time() * 1000)


@agent("probe_sleep")
async def probe_sleep(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """A witnessed step, ``ctx.sleep(input["sleep_s"])``, then a step that
    records the wall clock (ms) when it ran: how late the run woke."""
    path = str(input["log"])

    def before() -> int:
        _witness(path, f"{ctx.run_id} 0 {ctx.peer_id} {ctx.epoch} start")
        _witness(path, f"{ctx.run_id} 0 {ctx.peer_id} {ctx.epoch} end")
        return wall_ms()

    slept_at_ms = await ctx.step("before", before)
    await ctx.sleep(float(input["sleep_s"]))
    woke_ms = await ctx.step("after", wall_ms)
    return {"slept_at_ms": slept_at_ms, "woke_ms": woke_ms}


@agent("probe_signalled")
async def probe_signalled(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """Waits for signal ``go``, then a step records the wall clock (ms) when
    it ran: the signal's 202 to this step is the resume latency."""
    await ctx.step("before", wall_ms)
    data = await ctx.wait_for_signal("go")
    woke_ms = await ctx.step("after", wall_ms)
    return {"data": data, "woke_ms": woke_ms}
