"""The durable context an agent runs in.

A run may be resumed on another peer at any point. Everything an agent wants to
survive that goes through the context: ``step`` results are journaled in
storage under the run's epoch and replayed (not re-executed) on resume, and
``emit`` events are durable before they count as sent. Every write is fenced:
once a newer epoch claims the run, writes of this attempt are refused and the
attempt ends with ``Fenced``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import msgpack

from storage.base import StaleEpoch, Step, Store


class Fenced(Exception):
    """A newer epoch owns the run; this attempt must stop without writing."""


class NonDeterminism(Exception):
    """On replay, the agent asked for a different step than the journal holds."""


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


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
    ) -> None:
        self.run_id = run_id
        self.epoch = epoch
        self.attempt = attempt
        self.peer_id = peer_id
        self._store = store
        self._journal = journal
        self._clock_ms = clock_ms
        self._seq = 0
        self._write_lock = asyncio.Lock()
        self._pending: list[asyncio.Future[None]] = []
        self.replayed_steps = 0
        self.executed_steps = 0

    async def step(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` once per run: its result is checkpointed, and on
        resume the stored result is returned without calling ``fn`` again."""
        seq = self._seq
        self._seq += 1
        if seq < len(self._journal):
            recorded = self._journal[seq]
            if recorded.name != name:
                raise NonDeterminism(
                    f"run {self.run_id}: step {seq} is {recorded.name!r} in the journal, "
                    f"but the agent asked for {name!r}; an agent must take the same steps "
                    "in the same order on replay"
                )
            self.replayed_steps += 1
            return unpack(recorded.value)
        value = fn(*args)
        if inspect.isawaitable(value):
            value = await value
        payload = pack(value)
        async with self._write_lock:
            await self._fenced(
                self._store.put_step(
                    self.run_id, self.epoch, seq, name, payload, self.peer_id, self._clock_ms()
                )
            )
        self.executed_steps += 1
        return value

    def emit(self, kind: str, data: Any = None) -> asyncio.Future[None]:
        """Queue a durable event; events are written in emit order. Awaiting the
        returned future waits until this one is stored."""
        fut = asyncio.ensure_future(self._write_event(kind, pack(data)))
        self._pending.append(fut)
        return fut

    async def _write_event(self, kind: str, data: bytes) -> None:
        async with self._write_lock:
            await self._fenced(
                self._store.append_event(self.run_id, self.epoch, kind, data, self._clock_ms())
            )

    async def drain(self) -> None:
        """Wait for every emitted event; raise Fenced if any write was refused."""
        pending, self._pending = self._pending, []
        results = await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _fenced(self, write: Any) -> None:
        try:
            await write
        except StaleEpoch as exc:
            raise Fenced(str(exc)) from exc
