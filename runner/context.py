"""The durable context an agent runs in.

A run may be resumed on another peer at any point, and it resumes by running
the agent again from the top. Everything an agent wants to survive that goes
through the context:

- ``step`` results are journaled in storage under the run's epoch and replayed
  (not re-executed) on resume; a step is identified by its position, so the
  agent must ask for the same steps in the same order (``NonDeterminism``
  otherwise);
- ``sleep`` journals its wake-up time, so a resumed run only sleeps what is left;
- ``spawn`` journals the child's id, so a resumed parent waits for the same
  child instead of starting another one;
- ``wait_for_signal`` journals what it delivered (the signal's data, or that
  it timed out), so a replay returns the same answer and each signal of a name
  is consumed once, in order;
- ``emit`` events are durable before they count as sent. Each is stored with
  its place in the agent's flow (the step position it follows, and its rank
  there), so the events a replay emits again, which an earlier attempt already
  stored, are not stored twice; events emitted inside a step that is replayed
  are simply not emitted again.

Every write is fenced: once a newer epoch claims the run, writes of this
attempt are refused and the attempt ends with ``Fenced``.

Waiting costs nothing (DESIGN.md): a sleep of ``suspend_after_s`` or more, a
signal that is not there yet and children still running end the attempt with
``Suspending``; the run leaves its slot, the leader queues it again when its
wait is over, and the next attempt replays to the same call, which then
returns. Shorter sleeps and short signal timeouts wait in memory.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Generator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from raftmesh.consensus.status import TERMINAL_STATUSES
from raftmesh.consensus.waits import CHILDREN, SIGNAL, TIMER, valid_signal_name
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.outages import retry_unavailable
from raftmesh.runner.payload import pack, unpack
from raftmesh.runner.rate_limits import Limiter, Permit
from raftmesh.runner.spans import NO_SPANS, Spans
from raftmesh.storage.base import RunRow, StaleEpoch, Step, StorageUnavailable, Store

BUDGET_KEYS = ("model_calls", "tokens")
CHILD_POLL_S = 0.2


class Fenced(Exception):
    """A newer epoch owns the run; this attempt must stop without writing."""


class Released(Exception):
    """The peer hands the run back (drain --release, shutdown) at a step
    boundary: every finished step is checkpointed, none is half done."""


class Suspending(BaseException):  # noqa: N818 (control flow, like CancelledError)
    """The attempt ends here and the run waits for ``wait`` (the map
    consensus/waits.py reads) without a slot. A BaseException, like
    CancelledError, so an agent's ``except Exception`` cannot swallow it."""

    def __init__(self, wait: dict[str, Any]) -> None:
        super().__init__(f"run waits for {wait}")
        self.wait = wait


class SignalTimeout(Exception):
    """``wait_for_signal`` gave up: no signal of that name came in time."""

    def __init__(self, name: str, timeout_s: float) -> None:
        super().__init__(f"no signal {name!r} within {timeout_s}s")
        self.name = name
        self.timeout_s = timeout_s


class RunError(Exception):
    """A failure that another attempt cannot fix: the run fails without a retry."""


class NonDeterminism(RunError):
    """On replay, the agent asked for a different step than the journal holds."""


class LimitExceeded(RunError):
    """A fan-out limit of the runtime refused what the agent asked for."""


class FanOutLimit(LimitExceeded):
    pass


class DepthLimit(LimitExceeded):
    pass


class BudgetExhausted(LimitExceeded):
    pass


class EventLimit(LimitExceeded):
    """The run stored ``Limits.max_events`` events: a loop emitting without end
    fails its run (no retry: the stored events still count) instead of filling
    storage."""


class UnknownRateLimit(RunError):
    """``ctx.limit`` named a limit this peer's settings do not define."""


class ChildFailed(Exception):
    """A child run ended in a status other than succeeded."""

    def __init__(self, child_id: str, status: str, error: str | None) -> None:
        super().__init__(f"child run {child_id} {status}: {error}")
        self.child_id = child_id
        self.status = status
        self.error = error


@dataclass(frozen=True)
class Limits:
    """Fan-out bounds enforced by the runtime, whatever the agent (or a model) asks."""

    max_children: int = 16
    max_depth: int = 3
    max_events: int = 100_000


class MeshLink(Protocol):
    """What the context needs from the peer to start child runs."""

    async def spawn(self, spec: dict[str, Any]) -> str:
        """Commit a child run (idempotent by ``spec["idempotency_key"]``); return its id."""


class RunContext:
    def __init__(
        self,
        *,
        run_id: str,
        epoch: int,
        attempt: int,
        peer_id: str,
        store: Store,
        journal: list[Step],
        clock_ms: Callable[[], int],
        stored_events: frozenset[tuple[int, int]] = frozenset(),
        tenant: str = "default",
        depth: int = 0,
        budget: Mapping[str, int] | None = None,
        limits: Limits = Limits(),
        mesh: MeshLink | None = None,
        release: asyncio.Event | None = None,
        spans: Spans = NO_SPANS,
        models: Mapping[str, ModelEndpoint] | None = None,
        suspend_after_s: float | None = None,
        rate_limiter: Limiter | None = None,
    ) -> None:
        """``suspend_after_s`` None: this context never suspends (waits are
        served in memory, children and signals polled), as outside a mesh."""
        self.run_id = run_id
        self._rate_limiter = rate_limiter
        # The peer's configured model endpoints: the only ones an agent may call.
        self.models: dict[str, ModelEndpoint] = dict(models or {})
        self._release = release
        self._spans = spans
        self.epoch = epoch
        self.attempt = attempt
        self.peer_id = peer_id
        self.tenant = tenant
        self.depth = depth
        self.budget = dict(budget) if budget is not None else None
        self.limits = limits
        self.state: dict[str, Any] = {}
        self._store = store
        self._journal = {step.seq: step for step in journal}
        self._clock_ms = clock_ms
        self._stored_events = stored_events
        self._mesh = mesh
        self._seq = 0
        self._emit_ranks: dict[int, int] = {}
        self._new_events = 0
        self._children = 0
        self._spent = dict.fromkeys(BUDGET_KEYS, 0)
        self._write_lock = asyncio.Lock()
        self._pending: list[asyncio.Future[None]] = []
        self._spawning: list[asyncio.Future[str]] = []
        self._cancelled = asyncio.Event()
        self.replayed_steps = 0
        self.executed_steps = 0
        self._agent_task: asyncio.Future[Any] | None = None
        self._suspend_after_ms = None if suspend_after_s is None else int(suspend_after_s * 1000)
        # Per signal name: how many this replay has consumed so far.
        self._signals_taken: dict[str, int] = {}

    @property
    def store(self) -> Store:
        """The run's storage, for integrations that keep their own durable
        state beside the journal (a LangGraph checkpointer), fenced by ``epoch``."""
        return self._store

    def bind_task(self, task: asyncio.Future[Any]) -> None:
        """The runner hands over the agent's task so that ``cancel`` can stop it."""
        self._agent_task = task
        if self.cancelled:
            task.cancel()

    # -- steps ------------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` once per run: its result is checkpointed, and on
        resume the stored result is returned without calling ``fn`` again."""
        seq, found, value = self.begin_step(name)
        if found:
            return value
        self.stop_if_released(seq, name)
        with self.span("raftmesh.step", step_seq=seq, step_name=name):
            value = fn(*args)
            if inspect.isawaitable(value):
                value = await value
            await self.record_step(seq, name, value)
        return value

    def stop_if_released(self, seq: int, name: str) -> None:
        """Released if the peer hands the run back (a drain, a shutdown, an
        operator's pause): checked before a new step starts, so every step
        done so far is checkpointed and none is half done."""
        if self._release is not None and self._release.is_set():
            raise Released(f"run {self.run_id} released before step {seq} ({name!r})")

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        """A span of the run's trace around part of the agent's work (a step's
        is opened here; a replayed step has none, it does no work)."""
        return self._spans.span(name, {"run_id": self.run_id, "epoch": self.epoch, **attributes})

    def begin_step(self, name: str) -> tuple[int, bool, Any]:
        """Take the next step position; ``(seq, True, value)`` when the journal
        already holds it. Synchronous, so concurrent steps get positions in the
        order the agent asked for them, the same on every replay."""
        seq = self._seq
        self._seq += 1
        recorded = self._journal.get(seq)
        if recorded is None:
            return seq, False, None
        if recorded.name != name:
            raise NonDeterminism(
                f"run {self.run_id}: step {seq} is {recorded.name!r} in the journal, "
                f"but the agent asked for {name!r}; an agent must take the same steps "
                "in the same order on replay"
            )
        self.replayed_steps += 1
        return seq, True, unpack(recorded.value)

    async def record_step(self, seq: int, name: str, value: Any) -> None:
        payload = pack(value)
        async with self._write_lock:
            # put_step is idempotent per (run, seq), so retrying it is safe.
            await self._fenced(
                retry_unavailable(
                    lambda: self._store.put_step(
                        self.run_id, self.epoch, seq, name, payload, self.peer_id, self._clock_ms()
                    ),
                    "put_step",
                )
            )
        self.executed_steps += 1

    async def sleep(self, seconds: float) -> None:
        """A durable timer: the wake-up time is journaled, so a run resumed
        elsewhere sleeps only what is left of it (nothing if it was served)."""
        wake_ms = await self.step("sleep", lambda: self._clock_ms() + int(seconds * 1000))
        remaining_ms = wake_ms - self._clock_ms()
        if self._suspends(remaining_ms):
            raise Suspending({"kind": TIMER, "due_ms": wake_ms})
        if remaining_ms > 0:
            await asyncio.sleep(remaining_ms / 1000)

    def _suspends(self, wait_ms: int | None) -> bool:
        """Whether a wait this long (None: unbounded) is worth the slot: the
        run leaves it rather than wait in memory."""
        if self._suspend_after_ms is None or self.cancelled:
            return False
        return wait_ms is None or wait_ms >= self._suspend_after_ms

    # -- signals ----------------------------------------------------------

    async def wait_for_signal(self, name: str, timeout_s: float | None = None) -> Any:
        """The data of the next signal of ``name`` sent to this run (sent
        before this call or after), or SignalTimeout after ``timeout_s``.
        Signals of one name are delivered in the order they were stored,
        each once; what was delivered is journaled, so a replay returns it again."""
        if not valid_signal_name(name):
            raise ValueError(f"a signal name is 1 to 128 of A-Za-z0-9_.:-, not {name!r}")
        if timeout_s is not None and not 0 <= timeout_s < 1e9:
            raise ValueError(f"timeout_s must be a number of seconds, not {timeout_s!r}")
        due_ms = None
        if timeout_s is not None:
            due_ms = await self.step(
                f"signal-due:{name}", lambda: self._clock_ms() + int(timeout_s * 1000)
            )
        index = self._signals_taken.get(name, 0)
        seq, found, delivered = self.begin_step(f"signal:{name}")
        if not found:
            delivered = await self._next_signal(name, index, due_ms)
            await self.record_step(seq, f"signal:{name}", delivered)
        if "data" not in delivered:
            raise SignalTimeout(name, timeout_s or 0.0)
        self._signals_taken[name] = index + 1
        return delivered["data"]

    async def _next_signal(self, name: str, index: int, due_ms: int | None) -> dict[str, Any]:
        """``{"data": ...}`` once signal ``index`` of ``name`` is stored,
        ``{"timeout": True}`` once ``due_ms`` has passed; the attempt suspends
        rather than wait long for either."""
        while True:
            data = await retry_unavailable(
                lambda: self._store.get_signal(self.run_id, name, index), "get_signal"
            )
            if data is not None:
                return {"data": unpack(data)}
            left_ms = None if due_ms is None else due_ms - self._clock_ms()
            if left_ms is not None and left_ms <= 0:
                return {"timeout": True}
            if self._suspends(left_ms):
                wait = {"kind": SIGNAL, "signal": name, "index": index, "due_ms": due_ms}
                raise Suspending(wait)
            poll_s = CHILD_POLL_S if left_ms is None else min(CHILD_POLL_S, left_ms / 1000)
            await asyncio.sleep(poll_s)

    async def checkpoint(self) -> None:
        """Save ``ctx.state``; on replay it is restored to what was saved here."""
        self.state = await self.step("checkpoint", lambda: dict(self.state))

    # -- events -----------------------------------------------------------

    def emit(self, kind: str, data: Any = None) -> asyncio.Future[None]:
        """Queue a durable event; events are written in emit order. Awaiting the
        returned future waits until this one is stored.

        An event that an earlier attempt stored at the same place in the flow
        is not stored again, so watchers see each event once."""
        place = (self._seq, self._emit_ranks.get(self._seq, 0))
        self._emit_ranks[self._seq] = place[1] + 1
        if place in self._stored_events:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        if len(self._stored_events) + self._new_events >= self.limits.max_events:
            raise EventLimit(
                f"run {self.run_id}: event limit reached: it stored {self.limits.max_events} "
                f"events (max_events_per_run); emit fewer, coarser events (event {kind!r} refused)"
            )
        self._new_events += 1
        payload = pack({"at": list(place), "data": data})
        fut = asyncio.ensure_future(self._write_event(kind, payload))
        self._pending.append(fut)
        return fut

    async def _write_event(self, kind: str, data: bytes) -> None:
        tried = False

        async def append() -> None:
            # An append cut off by an outage may have committed: look before
            # writing again, so watchers never see an event twice.
            nonlocal tried
            if tried and await self._event_stored(kind, data):
                return
            tried = True
            await self._store.append_event(self.run_id, self.epoch, kind, data, self._clock_ms())

        async with self._write_lock:
            await self._fenced(retry_unavailable(append, "append_event"))

    async def _event_stored(self, kind: str, data: bytes) -> bool:
        after = 0
        while True:
            page = await self._store.read_events(self.run_id, after_seq=after)
            if any(e.epoch == self.epoch and e.kind == kind and e.data == data for e in page):
                return True
            if not page:
                return False
            after = page[-1].seq

    async def drain(self) -> None:
        """Wait for every emitted event; raise Fenced if any write was refused."""
        pending, self._pending = self._pending, []
        results = await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def abandon(self) -> None:
        """The attempt is over: stop child submissions still in flight. Safe, as
        a retried spawn finds its child again by idempotency key. Event writes
        still in flight finish, and a refused one (Fenced, the attempt is
        already over) is not reported again as a task nobody awaited: its
        traceback would be printed from a finalizer, which CPython 3.11 can do
        in the middle of an ast.parse and so break every later parse."""
        for pending in self._pending:
            pending.add_done_callback(_retrieve)
        for fut in self._spawning:
            if fut.done():
                if not fut.cancelled():
                    fut.exception()  # retrieved: it was reported with the attempt
            else:
                fut.cancel()
        self._spawning.clear()

    # -- budget -----------------------------------------------------------

    def remaining(self, key: str) -> int | None:
        """What is left of budget ``key`` (None: unbounded)."""
        if self.budget is None or key not in self.budget:
            return None
        return self.budget[key] - self._spent[key]

    def require(self, **amounts: int) -> None:
        """Raise BudgetExhausted unless ``amounts`` can still be spent."""
        for key, amount in amounts.items():
            left = self.remaining(key)
            if left is not None and amount > left:
                raise BudgetExhausted(
                    f"run {self.run_id}: budget exhausted: needs {amount} {key}, "
                    f"{left} left of {self.budget[key] if self.budget else 0}"
                )

    def charge(self, **amounts: int) -> None:
        """Spend budget; the spend is recomputed from replayed steps on resume,
        so it needs no journal of its own. Raises BudgetExhausted past the limit."""
        for key in amounts:
            if key not in self._spent:
                raise ValueError(f"unknown budget {key!r}; use {', '.join(BUDGET_KEYS)}")
        self.require(**amounts)
        for key, amount in amounts.items():
            self._spent[key] += amount

    @property
    def spent(self) -> dict[str, int]:
        return dict(self._spent)

    # -- mesh-wide rate limits (runner/rate_limits.py) ----------------------

    def limit(self, name: str, tokens: int = 0) -> Permit:
        """Capacity of the mesh-wide limit ``name`` for one call of about
        ``tokens`` tokens, waited for without a deadline of its own:
        ``async with ctx.limit("openai", tokens=n): <the call>``. The block
        holds one of the limit's concurrent calls until it ends; a limit with
        no concurrency count may also be taken as ``await ctx.limit(...)``.
        Take it inside the step that calls the model: a replayed step calls
        nothing and takes nothing."""
        if self._rate_limiter is None or name not in self._rate_limiter.names:
            known = ", ".join(self._rate_limiter.names) if self._rate_limiter else ""
            raise UnknownRateLimit(
                f"run {self.run_id}: no rate limit named {name!r} on this peer; configured: "
                f"{known or 'none'} (MESH_RATE_LIMITS or [rate_limits])"
            )
        return self._rate_limiter.limit(name, tokens)

    # -- children ---------------------------------------------------------

    def spawn(
        self, agent: str, input: Any, *, budget: Mapping[str, int] | None = None, **opts: Any
    ) -> ChildRun:
        """Start a child run through the mesh's scheduler; await the handle for
        its result. Bounded by ``limits`` and by this run's budget, from which a
        child's ``budget`` is drawn."""
        if self._mesh is None:
            raise RuntimeError("this context cannot start child runs")
        if self._children >= self.limits.max_children:
            raise FanOutLimit(
                f"run {self.run_id}: fan-out limit reached: at most "
                f"{self.limits.max_children} children per run"
            )
        if self.depth + 1 > self.limits.max_depth:
            raise DepthLimit(
                f"run {self.run_id}: depth limit reached: a run at depth {self.depth} "
                f"cannot start a child (max depth {self.limits.max_depth})"
            )
        grant = self._grant(budget)
        self._children += 1
        seq, found, child_id = self.begin_step(f"spawn:{agent}")
        spec = {
            "agent": agent,
            "input": input,
            "tenant": opts.pop("tenant", self.tenant),
            **opts,
            "parent_id": self.run_id,
            "depth": self.depth + 1,
            "budget": grant,
            "idempotency_key": f"{self.run_id}/child/{seq}",
        }
        if found:
            submitted: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            submitted.set_result(child_id)
        else:
            submitted = asyncio.ensure_future(self._submit_child(seq, spec))
            self._spawning.append(submitted)
        return ChildRun(self, agent, submitted)

    def _grant(self, budget: Mapping[str, int] | None) -> dict[str, int] | None:
        if self.budget is None:
            return dict(budget) if budget is not None else None
        if budget is None:
            raise BudgetExhausted(
                f"run {self.run_id} has a budget; give each child its share with "
                "spawn(..., budget={...})"
            )
        self.require(**{k: v for k, v in budget.items() if k in self.budget})
        for key, amount in budget.items():
            if key in self._spent:
                self._spent[key] += amount
        return dict(budget)

    async def _submit_child(self, seq: int, spec: dict[str, Any]) -> str:
        assert self._mesh is not None
        child_id = await self._mesh.spawn(spec)
        await self.record_step(seq, f"spawn:{spec['agent']}", child_id)
        return child_id

    async def gather(self, *children: Awaitable[Any]) -> list[Any]:
        """Results of several children (or any awaitables), in argument order.
        While any child given here still runs, the run suspends waiting for
        all of them at once (one wake, not one per child)."""
        try:
            ids = [await child.id() for child in children if isinstance(child, ChildRun)]
            await self._suspend_unless_ended(ids)
        except BaseException:
            for child in children:
                if inspect.iscoroutine(child):
                    child.close()  # never started: nothing to undo
            raise
        return list(await asyncio.gather(*children))

    async def children_results(self, child_ids: list[str]) -> list[Any]:
        """``gather`` for children known by id (what an isolated agent sends)."""
        ended = await self._suspend_unless_ended(child_ids)
        return [
            _child_outcome(ended[child_id])
            if child_id in ended
            else await self.child_result(child_id)
            for child_id in child_ids
        ]

    async def child_result(self, child_id: str) -> Any:
        """Wait until the child's outcome is stored; its result, or ChildFailed."""
        row = (await self._suspend_unless_ended([child_id])).get(child_id)
        while row is None:
            try:
                found = await self._store.get_run(child_id)
            except StorageUnavailable:
                found = None
            if found is not None and found.status in TERMINAL_STATUSES:
                row = found
            else:
                await asyncio.sleep(CHILD_POLL_S)
        return _child_outcome(row)

    async def _suspend_unless_ended(self, child_ids: list[str]) -> dict[str, RunRow]:
        """Suspend waiting for those of ``child_ids`` whose outcome is not
        stored; the stored outcomes it read, so the caller need not read them
        again (none when this context never suspends: the caller polls)."""
        if not child_ids or not self._suspends(None):
            return {}
        ended: dict[str, RunRow] = {}
        running = []
        for child_id in child_ids:
            row = await retry_unavailable(partial(self._store.get_run, child_id), "get_run")
            if row is None or row.status not in TERMINAL_STATUSES:
                running.append(child_id)
            else:
                ended[child_id] = row
        if running:
            raise Suspending({"kind": CHILDREN, "children": running})
        return ended

    # -- cancellation -----------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the run was cancelled; an agent may poll it between steps."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Cancel the run: the agent's task gets CancelledError at its next await
        and the attempt ends as ``cancelled`` (terminal, never retried)."""
        self._cancelled.set()
        if self._agent_task is not None and not self._agent_task.done():
            self._agent_task.cancel()

    async def _fenced(self, write: Any) -> None:
        try:
            await write
        except StaleEpoch as exc:
            raise Fenced(str(exc)) from exc


def _child_outcome(row: RunRow) -> Any:
    """A child's stored outcome: its result, or ChildFailed."""
    if row.status != "succeeded":
        raise ChildFailed(row.id, row.status, row.error)
    return unpack(row.result) if row.result is not None else None


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


class ChildRun:
    """A child run started by ``ctx.spawn``; ``await`` it for its result."""

    def __init__(self, ctx: RunContext, agent: str, submitted: asyncio.Future[str]) -> None:
        self.agent = agent
        self._ctx = ctx
        self._submitted = submitted

    async def id(self) -> str:
        return await self._submitted

    async def result(self) -> Any:
        return await self._ctx.child_result(await self._submitted)

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result().__await__()
