"""Fixtures that hand every test a fresh namespace on a real database.

PostgreSQL tests get a schema of their own (dropped afterwards), SQLite tests
a file in tmp_path, so tests never see each other's rows and may run while
other suites use the same server. RAFTMESH_TEST_POSTGRES_URL picks the server.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from storage_support import PG_URL, MakeStore, Target

from raftmesh.storage import Store, open_store


@pytest.fixture
def sqlite_target(tmp_path: Path) -> Target:
    path = tmp_path / "raftmesh.db"
    return Target(f"sqlite:///{path}", sqlite_path=path)


@pytest.fixture
async def pg_target() -> AsyncIterator[Target]:
    schema = f"t_{uuid.uuid4().hex}"
    separator = "&" if "?" in PG_URL else "?"
    yield Target(f"{PG_URL}{separator}schema={schema}", pg_schema=schema)
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "pg"])
def target(request: pytest.FixtureRequest) -> Target:
    return request.getfixturevalue(f"{request.param}_target")


@pytest.fixture
async def make_store() -> AsyncIterator[MakeStore]:
    """Open stores on demand (several peers on one database) and close them all after."""
    stores: list[Store] = []

    async def make(url: str) -> Store:
        store = open_store(url)
        await store.open()
        stores.append(store)
        return store

    yield make
    for store in reversed(stores):
        await store.close()


@pytest.fixture
async def store(target: Target, make_store: MakeStore) -> Store:
    return await make_store(target.url)
