"""GroupCommit on its own: who waits, what goes together, who hears an error."""

from __future__ import annotations

import asyncio

import pytest

from raftmesh.storage.group_commit import GroupCommit


async def turns() -> None:
    """Let every task that is ready run (a write, then the drain it starts)."""
    for _ in range(5):
        await asyncio.sleep(0)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def write(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in items]


async def test_a_lone_write_goes_at_once_and_waiting_ones_go_together() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec.write, writers=1, batch_max=3)
    first = asyncio.ensure_future(group.write(1))
    await turns()
    assert rec.batches == [[1]], "nothing in flight: the write leaves alone, at once"
    rest = [asyncio.ensure_future(group.write(i)) for i in range(2, 7)]
    await turns()
    assert rec.batches == [[1]], "one writer: the others wait for it"
    rec.release.set()
    assert await first == 10
    assert await asyncio.gather(*rest) == [20, 30, 40, 50, 60]
    assert rec.batches == [[1], [2, 3, 4], [5, 6]], "those that waited went in batches of 3"


async def test_an_error_reaches_every_caller_of_its_batch_and_only_them() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec.write, writers=1, batch_max=10)
    rec.fail = RuntimeError("database gone")
    writes = [asyncio.ensure_future(group.write(i)) for i in range(3)]
    await turns()
    rec.release.set()
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    assert [type(o) for o in outcomes] == [RuntimeError] * 3
    rec.fail = None
    assert await group.write(7) == 70, "the next write is not held by the failed batch"


async def test_a_caller_that_gave_up_before_its_batch_left_is_not_written() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec.write, writers=1, batch_max=10)
    first = asyncio.ensure_future(group.write(1))
    await turns()
    gave_up = asyncio.ensure_future(group.write(2))
    kept = asyncio.ensure_future(group.write(3))
    await turns()
    gave_up.cancel()
    rec.release.set()
    assert (await first, await kept) == (10, 30)
    with pytest.raises(asyncio.CancelledError):
        await gave_up
    assert rec.batches == [[1], [3]]
