"""Group commit: writes of concurrent callers that wait go together in one statement.

A write goes at once while fewer than ``writers`` statements are in flight;
otherwise it waits, and every write that waited goes in the next statement, up
to ``batch_max`` of them. So a lone writer pays one round trip as before, and
under load one round trip and one commit carry many runs' writes (issue 12:
checkpoints queued behind the pool, one statement each).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class GroupCommit(Generic[Item, Answer]):
    def __init__(
        self,
        write: Callable[[list[Item]], Awaitable[list[Answer]]],
        writers: int,
        batch_max: int,
    ) -> None:
        """``write(items)`` stores them in one statement and answers one value
        per item, in order; if it raises, every caller in the batch gets the error."""
        self._write = write
        self._writers = writers
        self._batch_max = batch_max
        self._waiting: list[tuple[Item, asyncio.Future[Answer]]] = []
        self._in_flight = 0
        # asyncio keeps only weak references to tasks.
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, item: Item) -> Answer:
        done: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._in_flight < self._writers:
            self._in_flight += 1
            task = asyncio.ensure_future(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await done

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._batch_max]
                del self._waiting[: self._batch_max]
                # A caller that gave up before its write left is not written.
                batch = [(item, done) for item, done in batch if not done.done()]
                if batch:
                    await self._send(batch)
        finally:
            self._in_flight -= 1

    async def _send(self, batch: list[tuple[Item, asyncio.Future[Answer]]]) -> None:
        try:
            answers = await self._write([item for item, _ in batch])
        except Exception as exc:
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        except BaseException:  # cancelled (the loop is closing): so are the callers
            for _, done in self._waiting + batch:
                done.cancel()
            raise
        for (_, done), answer in zip(batch, answers, strict=True):
            if not done.done():
                done.set_result(answer)
