"""Agents loaded into test peers (MESH_AGENT_MODULES=probe_agents).

``probe_steps`` is ``steps`` with a witness: every time a step's function
starts or ends it appends a line to a file, outside the mesh's storage, so a
test sees a step that ran twice even if only one result was checkpointed.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

try:
    from raftmesh.runner.context import RunContext
    from raftmesh.runner.registry import agent
except ImportError:
    # The release before the raftmesh namespace (tests/e2e/test_upgrade.py
    # runs peers of it) installs its packages at the top level.
    from runner.context import RunContext  # type: ignore[no-redef]  # noqa: TID251
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
