"""MeshCheckpointSaver against LangGraph's own conformance suite, on both
backends, and the fencing that makes it safe inside a run."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import ProgressCallbacks
from storage_support import PG_URL

from raftmesh.consensus.spec import RunSpec
from raftmesh.runner.integrations.langgraph import MeshCheckpointSaver
from raftmesh.storage import RunRow, StaleEpoch, open_store
from raftmesh.storage.graph_checkpoints import Fence, GraphCheckpoints


def _pg_url(schema: str) -> str:
    return f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"


async def _drop(schema: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def test_conformance_on_postgres() -> None:
    schemas: list[str] = []

    @checkpointer_test(name="MeshCheckpointSaver[postgres]")
    async def saver() -> AsyncIterator[MeshCheckpointSaver]:
        schemas.append(f"lg_{uuid.uuid4().hex}")
        async with MeshCheckpointSaver.open(_pg_url(schemas[-1])) as opened:
            yield opened

    try:
        report = await validate(saver, progress=ProgressCallbacks.verbose())
    finally:
        for schema in schemas:
            await _drop(schema)
    report.print_report()
    assert report.passed_all(), report.to_dict()


async def test_conformance_on_sqlite(tmp_path: Path) -> None:
    @checkpointer_test(name="MeshCheckpointSaver[sqlite]")
    async def saver() -> AsyncIterator[MeshCheckpointSaver]:
        async with MeshCheckpointSaver.open(
            f"sqlite:///{tmp_path / uuid.uuid4().hex}.db"
        ) as opened:
            yield opened

    report = await validate(saver, progress=ProgressCallbacks.verbose())
    report.print_report()
    assert report.passed_all(), report.to_dict()


def _config(thread: str, checkpoint_id: str | None = None) -> dict:
    conf = {"thread_id": thread, "checkpoint_ns": ""}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


@pytest.mark.parametrize("backend", ["sqlite", "pg"])
async def test_a_stale_epoch_cannot_write_a_checkpoint(backend: str, tmp_path: Path) -> None:
    schema = f"lg_{uuid.uuid4().hex}"
    url = _pg_url(schema) if backend == "pg" else f"sqlite:///{tmp_path / 'fence.db'}"
    store = open_store(url)
    await store.open()
    try:
        run = RunRow(id="r1", spec=RunSpec(agent="langgraph", input=b"\x80"))
        await store.claim(run, 1, "peer-a", 0)
        tables = GraphCheckpoints(store)
        old = MeshCheckpointSaver(tables, fenced=Fence("r1", 1))
        first = await old.aput(_config("r1"), empty_checkpoint(), {"step": 0}, {})

        await store.claim(run, 2, "peer-b", 1)
        new = MeshCheckpointSaver(tables, fenced=Fence("r1", 2))
        with pytest.raises(StaleEpoch):
            await old.aput(first, empty_checkpoint(), {"step": 1}, {})
        with pytest.raises(StaleEpoch):
            await old.aput_writes(first, [("x", 1)], "task-1")
        with pytest.raises(StaleEpoch):
            await old.adelete_thread("r1")
        assert [t.metadata["step"] async for t in new.alist(_config("r1"))] == [0]
        assert (await new.aget_tuple(first)).pending_writes == []
        await new.aput(first, empty_checkpoint(), {"step": 1}, {})
        assert [t.metadata["step"] async for t in new.alist(_config("r1"))] == [1, 0]
    finally:
        await store.close()
        if backend == "pg":
            await _drop(schema)


async def test_sync_methods_from_another_thread(tmp_path: Path) -> None:
    async with MeshCheckpointSaver.open(f"sqlite:///{tmp_path / 'sync.db'}") as saver:
        stored = await asyncio.to_thread(
            saver.put, _config("t"), empty_checkpoint(), {"source": "input"}, {}
        )
        found = await asyncio.to_thread(saver.get_tuple, stored)
        assert found is not None and found.metadata["source"] == "input"
        assert len(await asyncio.to_thread(lambda: list(saver.list(None)))) == 1
        with pytest.raises(RuntimeError, match="async ones"):
            saver.get_tuple(stored)
