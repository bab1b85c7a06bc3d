"""A PostgreSQL connection lost inside a transaction is an outage, not a failure.

asyncpg ends the transaction block on the dead connection with
InterfaceError ("cannot call Transaction.__aexit__(): the underlying
connection is closed"), which hid the connection error behind it: a step
write caught by a database outage failed its run instead of being retried
(found by the chaos soak, seed 2: "failed by the infrastructure"). Here the
write is held inside its transaction by a row lock while the proxy in front
of the server resets every connection, as a database restart would.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from storage_support import PG_URL

from raftmesh.chaos.proxy import REFUSED, UP
from raftmesh.consensus.spec import RunSpec
from raftmesh.storage import StorageUnavailable
from raftmesh.storage.base import RunRow


async def test_a_write_whose_connection_dies_in_its_transaction_is_unavailable(proxied_pg) -> None:
    store, link, schema = proxied_pg
    await store.claim(RunRow("run-1", RunSpec("a", input=b"")), 1, "p", 0)
    holder = await asyncpg.connect(PG_URL)
    try:
        lock = holder.transaction()
        await lock.start()
        await holder.execute(f'SELECT 1 FROM "{schema}".runs WHERE id = $1 FOR UPDATE', "run-1")
        write = asyncio.create_task(store.put_step("run-1", 1, 0, "s0", b"v", "p", 1))

        async def blocked() -> bool:
            return bool(
                await holder.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )

        for _ in range(100):
            if await blocked():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the step write never waited for the row lock")
        link.set_state(REFUSED)
        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(write, 10)
        await lock.rollback()
    finally:
        await holder.close()
    link.set_state(UP)
    await store.put_step("run-1", 1, 0, "s0", b"v", "p", 2)
    assert [s.seq for s in await store.load_steps("run-1")] == [0]
