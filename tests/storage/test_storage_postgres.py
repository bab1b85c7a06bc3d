"""PostgreSQL behaviour beyond the shared contract: schemas, NOTIFY, outages."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from storage_support import PG_URL, MakeStore, Target

from raftmesh.consensus.spec import RunSpec
from raftmesh.storage import RunRow, StorageUnavailable
from raftmesh.storage.postgres import PostgresStore

NOTIFY_TIMEOUT_S = 5.0


async def claim_run(store: PostgresStore, run_id: str = "r1") -> None:
    await store.claim(RunRow(id=run_id, spec=RunSpec("echo", input=b"")), 1, "p1", 0)


async def test_tables_live_in_the_schema_named_by_the_url(
    pg_target: Target, make_store: MakeStore
) -> None:
    await make_store(pg_target.url)

    conn = await asyncpg.connect(PG_URL)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            pg_target.pg_schema,
        )
    finally:
        await conn.close()
    assert {t["table_name"] for t in tables} == {
        "runs",
        "steps",
        "events",
        "schema_migrations",
        "graph_checkpoints",
        "graph_blobs",
        "graph_writes",
    }


def test_events_channel_is_a_plain_identifier_per_schema() -> None:
    assert PostgresStore(f"{PG_URL}?schema=t_abc").events_channel == "raftmesh_events_t_abc"
    assert PostgresStore(f"{PG_URL}?schema=Tenant-1").events_channel == "raftmesh_events_tenant_1"
    assert PostgresStore(PG_URL).events_channel == "raftmesh_events_public"
    assert len(PostgresStore(f"{PG_URL}?schema={'x' * 80}").events_channel) == 63


def test_a_repeated_schema_parameter_is_refused() -> None:
    with pytest.raises(ValueError):
        PostgresStore(f"{PG_URL}?schema=a&schema=b")


async def test_notify_wakes_a_listener_on_another_peer(
    pg_target: Target, make_store: MakeStore
) -> None:
    watcher = await make_store(pg_target.url)
    writer = await make_store(pg_target.url)
    assert isinstance(watcher, PostgresStore) and isinstance(writer, PostgresStore)
    woken: asyncio.Queue[str] = asyncio.Queue()
    await watcher.listen(woken.put_nowait)
    await claim_run(writer)

    await writer.append_event("r1", 1, "progress", b"", 1)

    assert await asyncio.wait_for(woken.get(), NOTIFY_TIMEOUT_S) == "r1"


async def test_listener_comes_back_after_its_connection_is_killed(
    pg_target: Target, make_store: MakeStore
) -> None:
    store = await make_store(pg_target.url)
    assert isinstance(store, PostgresStore)
    woken: asyncio.Queue[str] = asyncio.Queue()
    await store.listen(woken.put_nowait)
    await claim_run(store)

    admin = await asyncpg.connect(PG_URL)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query = $1",
            f'LISTEN "{store.events_channel}"',
        )
    finally:
        await admin.close()
    assert killed == 1

    # Notifications sent before the listener is back are lost by design, so
    # keep appending until one gets through.
    deadline = time.monotonic() + NOTIFY_TIMEOUT_S
    while True:
        await store.append_event("r1", 1, "tick", b"", 0)
        try:
            assert await asyncio.wait_for(woken.get(), 0.2) == "r1"
            return
        except TimeoutError:
            assert time.monotonic() < deadline, "listener never came back"


async def test_an_unreachable_server_is_unavailable() -> None:
    # Port 1 on loopback refuses at once: nothing listens there.
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test?schema=nowhere")

    with pytest.raises(StorageUnavailable):
        await store.open()
    await store.close()
