"""Group commit of submitted runs' history rows.

A submission is answered once its run's row is in storage (or after a bound),
so that a peer whose replica lags finds the run there. One transaction per
submission made the database the limit of the acknowledgement rate: under
load, rows wait in a batch while the previous batch is written, and each batch
is one ``record_runs`` (one transaction), so the commit cost is shared by every
submission that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import logging

from raftmesh.storage.base import RunRow, Store

log = logging.getLogger("raftmesh.history")

# A batch is one multi-row write; bounded so that one slow batch does not
# hold thousands of submissions behind a single statement.
MAX_BATCH = 500


class HistoryWriter:
    """Writes queued runs' rows in batches, one writer at a time."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[tuple[RunRow, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    def record(self, row: RunRow) -> asyncio.Future[None]:
        """A future done once ``row`` is written or its write failed (logged:
        history is advisory here, the owner's claim inserts the row anyway)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        return done

    async def _write_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                await self._store.record_runs([row for row, _ in batch])
            except Exception as exc:
                log.warning("could not record the history of %d runs: %s", len(batch), exc)
            finally:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def close(self) -> None:
        """Stops writing; submissions still waiting are answered."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        for _, done in self._pending:
            if not done.done():
                done.set_result(None)
        self._pending = []
