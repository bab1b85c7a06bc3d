"""Submitted runs' history rows are group-committed on a real SQLite store:
rows arriving while a batch is written go in the next one, and a write that
fails or a writer that closes still answers every submission waiting on it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from raftmesh.consensus.spec import RunSpec
from raftmesh.mesh.history import HistoryWriter
from raftmesh.runner.payload import pack
from raftmesh.storage.base import RunRow
from raftmesh.storage.sqlite import SqliteStore


class CountingStore(SqliteStore):
    """A real store that counts its batches and can be made to fail."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.batches: list[int] = []
        self.fail = False

    async def record_runs(self, runs: list[RunRow]) -> None:
        self.batches.append(len(runs))
        await asyncio.sleep(0.05)  # a commit that takes long enough to gather behind it
        if self.fail:
            raise OSError("disk full")
        await super().record_runs(runs)


def row(i: int) -> RunRow:
    spec = RunSpec.from_wire({"agent": "echo", "input": None})
    return RunRow(id=f"run-{i}", spec=dataclasses.replace(spec, input=pack(i)))


@pytest.fixture
async def history(tmp_path: Path) -> AsyncIterator[tuple[CountingStore, HistoryWriter]]:
    store = CountingStore(str(tmp_path / "h.db"))
    await store.open()
    writer = HistoryWriter(store)
    try:
        yield store, writer
    finally:
        await writer.close()
        await store.close()


async def test_concurrent_submissions_share_batches_and_every_row_is_stored(
    history: tuple[CountingStore, HistoryWriter],
) -> None:
    store, writer = history
    first = writer.record(row(0))
    await asyncio.sleep(0)  # the first batch (one row) is being written
    rest = [writer.record(row(i)) for i in range(1, 200)]
    await asyncio.wait_for(asyncio.gather(first, *rest), 10)
    assert store.batches == [1, 199]
    for i in (0, 1, 199):
        stored = await store.get_run(f"run-{i}")
        assert stored is not None and stored.status == "queued"


async def test_a_failed_write_and_a_close_answer_every_waiting_submission(
    history: tuple[CountingStore, HistoryWriter],
) -> None:
    store, writer = history
    store.fail = True
    await asyncio.wait_for(asyncio.gather(*(writer.record(row(i)) for i in range(3))), 10)
    assert await store.get_run("run-0") is None
    store.fail = False
    in_flight = writer.record(row(10))
    await asyncio.sleep(0.01)
    behind = writer.record(row(11))
    await writer.close()
    assert in_flight.done() and behind.done()
