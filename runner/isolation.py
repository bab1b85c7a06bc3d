"""Process isolation: an agent in a subprocess with a memory limit.

An agent that allocates without bound or crashes the interpreter must fail its
own attempt, not take the peer (and every other run on it) down. With
``isolation: "process"`` the agent runs in ``python -m raftmesh.runner.isolation``,
whose address space is capped with RLIMIT_AS before it loads any agent code.
It gets the same ctx API; each call travels as a msgpack message over its
stdin/stdout pipes to the real RunContext in the peer, which keeps journaling,
fencing and budgets where they are for in-process agents. The child has no
storage connection and no Raft: it can only ask. Nor does it get the peer's
environment, which holds the cluster secret, the API token and model keys:
only what running Python needs (``child_env``) and what the peer's
``isolation_env`` setting names.

Calls that must keep the agent's order (step positions, emits, spawns) are
handled in the order the messages arrive; calls that wait (a step's write, a
sleep, a child's result) run concurrently so a ``gather`` in the child works.

Suspension works here as in a task: a wait the peer's RunContext turns into
``Suspending`` (a long sleep, a signal not yet sent, children still running)
ends the exchange, the child process is killed, and the resumed attempt
replays in a fresh one. ``ctx.gather`` of children only waits for all of
them at once; mixed with other awaitables it waits child by child.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import resource
import sys
from collections.abc import Callable, Generator, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import msgpack

from raftmesh.runner.context import (
    BUDGET_KEYS,
    ChildFailed,
    RunContext,
    SignalTimeout,
    Suspending,
)
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.rate_limits import Permit

PROCESS = "process"
TASK = "task"
ISOLATION_MODES = (TASK, PROCESS)

_READ_CHUNK = 1 << 16

# What the child needs to run Python and import the agent, and nothing else.
_BASE_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")


class IsolatedAgentError(Exception):
    """The isolated agent raised, ran out of memory, or its process died."""


def _pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


# -- the peer's side -------------------------------------------------------


def child_env(environ: Mapping[str, str], extra: Iterable[str] = ()) -> dict[str, str]:
    """The isolated agent's environment: the base variables, the locale
    (``LC_*``) and the ``extra`` names the operator chose, from ``environ``."""
    wanted = set(_BASE_ENV) | set(extra)
    return {k: v for k, v in environ.items() if k in wanted or k.startswith("LC_")}


async def run_isolated(
    ctx: RunContext,
    agent: str,
    input: Any,
    memory_mb: int,
    registry: Any,
    extra_env: Iterable[str] = (),
) -> Any:
    """Run ``agent`` in a subprocess limited to ``memory_mb`` of address space."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "raftmesh.runner.isolation",
        str(memory_mb),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=child_env(os.environ, extra_env),
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin
    waiting: set[asyncio.Task[None]] = set()
    failure: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    # Rate-limit permits the agent holds (``async with ctx.limit``), by call id.
    permits: dict[int, Permit] = {}

    async def hold(call_id: int, name: str, tokens: int) -> int:
        permit = ctx.limit(name, tokens)
        await permit.__aenter__()
        permits[call_id] = permit
        return call_id

    def reply(call_id: int, value: Any = None, error: BaseException | None = None) -> None:
        msg: dict[str, Any] = {"t": "reply", "id": call_id, "value": value}
        if error is not None:
            msg["error"] = {"type": type(error).__name__, "message": str(error)}
            if isinstance(error, ChildFailed):
                msg["error"]["child"] = [error.child_id, error.status, error.error]
            elif isinstance(error, SignalTimeout):
                msg["error"]["signal_timeout"] = [error.name, error.timeout_s]
        if not stdin.is_closing():
            stdin.write(_pack(msg))

    def later(call_id: int, work: Any, *, deliver_errors: bool = False) -> None:
        async def run() -> None:
            try:
                value = await work
            except ChildFailed as exc:
                reply(call_id, error=exc)
            except Suspending as exc:  # the attempt ends; the child never hears back
                if not failure.done():
                    failure.set_result(exc)
            except Exception as exc:  # the peer-side failure ends the attempt
                if deliver_errors:
                    reply(call_id, error=exc)
                elif not failure.done():
                    failure.set_result(exc)
            else:
                reply(call_id, value)

        task = asyncio.create_task(run())
        waiting.add(task)
        task.add_done_callback(waiting.discard)

    def dispatch(msg: dict[str, Any]) -> None:
        call_id, op, args = msg["id"], msg["op"], msg.get("args", [])
        if op == "begin_step":
            seq, found, value = ctx.begin_step(args[0])
            if not found:
                ctx.stop_if_released(seq, args[0])  # ends the exchange, as in a task
            reply(call_id, [seq, found, value])
        elif op == "record_step":
            later(call_id, ctx.record_step(*args))
        elif op == "emit":
            # Shielded: the agent may finish before its last events are stored,
            # and ending the exchange must not cancel those writes (drain waits).
            later(call_id, asyncio.shield(ctx.emit(args[0], args[1])))
        elif op == "sleep":
            later(call_id, ctx.sleep(args[0]))
        elif op == "checkpoint":
            ctx.state = args[0]
            later(call_id, _checkpoint(ctx))
        elif op == "require":
            ctx.require(**args[0])
            reply(call_id)
        elif op == "charge":
            ctx.charge(**args[0])
            reply(call_id)
        elif op == "spawn":
            agent_name, child_input, budget, opts = args
            child = ctx.spawn(agent_name, child_input, budget=budget, **opts)
            later(call_id, child.id())
        elif op == "child_result":
            later(call_id, ctx.child_result(args[0]), deliver_errors=True)
        elif op == "children_results":
            later(call_id, ctx.children_results(args[0]), deliver_errors=True)
        elif op == "wait_for_signal":
            later(call_id, ctx.wait_for_signal(args[0], args[1]), deliver_errors=True)
        elif op == "limit_hold":
            later(call_id, hold(call_id, *args))
        elif op == "limit_release":
            permits.pop(args[0]).release()
            reply(call_id)
        elif op == "limit_take":
            later(call_id, _take(ctx, *args))
        else:
            raise IsolatedAgentError(f"isolated agent made an unknown call {op!r}")

    start = {
        "t": "start",
        "agent": agent,
        "input": input,
        "refs": list(registry.references),
        "ctx": {
            "run_id": ctx.run_id,
            "epoch": ctx.epoch,
            "attempt": ctx.attempt,
            "peer_id": ctx.peer_id,
            "tenant": ctx.tenant,
            "depth": ctx.depth,
            "budget": ctx.budget,
            "models": {name: m.as_dict() for name, m in ctx.models.items()},
        },
    }
    messages = _MessageReader(proc.stdout)
    reader = asyncio.create_task(messages.next())
    try:
        stdin.write(_pack(start))
        await stdin.drain()
        while True:
            either: set[asyncio.Future[Any]] = {reader, failure}
            done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if failure in done:
                raise failure.result()
            batch = reader.result()
            if batch is None:
                code = await proc.wait()
                raise IsolatedAgentError(
                    f"isolated agent process exited with code {code} (memory limit {memory_mb} MB)"
                )
            for msg in batch:
                if msg["t"] == "done":
                    return msg["value"]
                if msg["t"] == "error":
                    raise IsolatedAgentError(
                        f"{msg['type']}: {msg['message']} (in an isolated process "
                        f"limited to {memory_mb} MB)"
                    )
                dispatch(msg)
            await stdin.drain()
            reader = asyncio.create_task(messages.next())
    finally:
        reader.cancel()
        for task in list(waiting):
            task.cancel()
        for permit in permits.values():
            permit.release()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _take(ctx: RunContext, name: str, tokens: int) -> None:
    await ctx.limit(name, tokens)


async def _checkpoint(ctx: RunContext) -> Any:
    await ctx.checkpoint()
    return ctx.state


class _MessageReader:
    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._stream = stream
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    async def next(self) -> list[dict[str, Any]] | None:
        """The next batch of whole messages; None at end of file."""
        while True:
            batch = list(self._unpacker)
            if batch:
                return batch
            data = await self._stream.read(_READ_CHUNK)
            if not data:
                return None
            self._unpacker.feed(data)


# -- the child's side --------------------------------------------------------


class _Link:
    """The child's end of the pipe: numbered calls, answered in any order."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self._next_id = 0
        self._calls: dict[int, asyncio.Future[Any]] = {}

    def send(self, msg: dict[str, Any]) -> None:
        self._out.write(_pack(msg))
        self._out.flush()

    def call(self, op: str, *args: Any) -> asyncio.Future[Any]:
        """Sent at once (so calls keep the agent's order); await for the answer."""
        call_id = self._next_id
        self._next_id += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self.send({"t": "call", "id": call_id, "op": op, "args": list(args)})
        return fut

    def answer(self, msg: dict[str, Any]) -> None:
        fut = self._calls.pop(msg["id"])
        error = msg.get("error")
        if error is None:
            fut.set_result(msg.get("value"))
        elif "child" in error:
            fut.set_exception(ChildFailed(*error["child"]))
        elif "signal_timeout" in error:
            fut.set_exception(SignalTimeout(*error["signal_timeout"]))
        else:
            fut.set_exception(RuntimeError(f"{error['type']}: {error['message']}"))


class IsolatedContext:
    """The ctx an isolated agent sees: the RunContext API, forwarded to the peer."""

    def __init__(self, link: _Link, info: dict[str, Any]) -> None:
        self._link = link
        self.run_id: str = info["run_id"]
        self.epoch: int = info["epoch"]
        self.attempt: int = info["attempt"]
        self.peer_id: str = info["peer_id"]
        self.tenant: str = info["tenant"]
        self.depth: int = info["depth"]
        self.budget: dict[str, int] | None = info["budget"]
        self.models = {name: ModelEndpoint(**m) for name, m in info["models"].items()}
        self.state: dict[str, Any] = {}
        self.cancelled = False
        # Mirrors the peer's count (RunContext.spent): every charge and child
        # grant passes through here on its way there, replayed ones too.
        self._spent = dict.fromkeys(BUDGET_KEYS, 0)

    async def step(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        seq, found, value = await self._link.call("begin_step", name)
        if found:
            return value
        value = fn(*args)
        if inspect.isawaitable(value):
            value = await value
        await self._link.call("record_step", seq, name, value)
        return value

    def emit(self, kind: str, data: Any = None) -> asyncio.Future[Any]:
        return self._link.call("emit", kind, data)

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        """None: the peer's tracer stays in the peer, which traces the
        attempt and its checkpoint writes, not this process's steps."""
        return contextlib.nullcontext()

    async def sleep(self, seconds: float) -> None:
        await self._link.call("sleep", seconds)

    async def checkpoint(self) -> None:
        self.state = await self._link.call("checkpoint", self.state)

    async def wait_for_signal(self, name: str, timeout_s: float | None = None) -> Any:
        return await self._link.call("wait_for_signal", name, timeout_s)

    def require(self, **amounts: int) -> None:
        """Checked by the peer in call order: past the budget, the peer fails the
        attempt before it answers any later call of this agent."""
        self._link.call("require", amounts)

    def charge(self, **amounts: int) -> None:
        self._link.call("charge", amounts)
        for key, amount in amounts.items():
            self._spent[key] = self._spent.get(key, 0) + amount

    @property
    def spent(self) -> dict[str, int]:
        return dict(self._spent)

    def spawn(
        self, agent: str, input: Any, *, budget: dict[str, int] | None = None, **opts: Any
    ) -> _IsolatedChild:
        if self.budget is not None and budget is not None:
            for key, amount in budget.items():
                if key in self._spent:
                    self._spent[key] += amount
        return _IsolatedChild(self._link, self._link.call("spawn", agent, input, budget, opts))

    async def gather(self, *children: Any) -> list[Any]:
        if children and all(isinstance(child, _IsolatedChild) for child in children):
            ids = [await child.id() for child in children]
            return list(await self._link.call("children_results", ids))
        return list(await asyncio.gather(*children))

    def limit(self, name: str, tokens: int = 0) -> _IsolatedPermit:
        """``RunContext.limit``, waited for (and held) by the peer."""
        return _IsolatedPermit(self._link, name, tokens)


class _IsolatedPermit:
    def __init__(self, link: _Link, name: str, tokens: int) -> None:
        self._link = link
        self._name = name
        self._tokens = tokens
        self._held: int | None = None

    async def __aenter__(self) -> _IsolatedPermit:
        self._held = int(await self._link.call("limit_hold", self._name, self._tokens))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._held is not None:
            await self._link.call("limit_release", self._held)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._link.call("limit_take", self._name, self._tokens).__await__()


class _IsolatedChild:
    def __init__(self, link: _Link, submitted: asyncio.Future[Any]) -> None:
        self._link = link
        self._submitted = submitted

    async def id(self) -> str:
        return str(await self._submitted)

    async def result(self) -> Any:
        return await self._link.call("child_result", await self.id())

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result().__await__()


async def _child_main(memory_mb: int) -> None:
    # The protocol owns the real stdout; whatever the agent prints goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    link = _Link(out)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    messages = _MessageReader(reader)
    batch = await messages.next()
    if not batch or batch[0]["t"] != "start":
        raise IsolatedAgentError("isolated agent got no start message")
    start, rest = batch[0], batch[1:]
    from raftmesh.runner.registry import build_registry

    registry = build_registry(tuple(start["refs"]))
    ctx = IsolatedContext(link, start["ctx"])
    for msg in rest:
        link.answer(msg)

    async def pump() -> None:
        while (more := await messages.next()) is not None:
            for msg in more:
                link.answer(msg)

    pumping = asyncio.create_task(pump())
    try:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        value = await registry.get(start["agent"])(ctx, start["input"])
    except MemoryError:
        link.send({"t": "error", "type": "MemoryError", "message": f"exceeded {memory_mb} MB"})
    except Exception as exc:  # reported to the peer as the attempt's failure
        link.send({"t": "error", "type": type(exc).__name__, "message": str(exc)})
    else:
        link.send({"t": "done", "value": value})
    finally:
        pumping.cancel()


if __name__ == "__main__":
    asyncio.run(_child_main(int(sys.argv[1])))
