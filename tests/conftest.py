"""Fixtures the whole suite shares."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from raftmesh.chaos.proxy import UP, Link
from raftmesh.storage import Store, open_store

PG_URL = os.environ.get("RAFTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """An embedded store of this test's own (the storage tests, which run
    against PostgreSQL too, have theirs)."""
    s = open_store(f"sqlite:///{tmp_path / 'mesh.db'}")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def proxied_pg() -> AsyncIterator[tuple[Store, Link, str]]:
    """A PostgreSQL store of its own schema, reached through the chaos
    harness's TCP proxy, so a test can refuse or reset its connections as a
    database restart would: (store, proxy link, schema)."""
    host_port = PG_URL.split("@", 1)[1].split("/", 1)[0]
    link = Link("db", host_port)
    await link.start()
    schema = f"proxied_{uuid.uuid4().hex[:12]}"
    store = open_store(PG_URL.replace(host_port, link.listen) + f"?schema={schema}")
    await store.open()
    try:
        yield store, link, schema
    finally:
        link.set_state(UP)
        await store.close()
        await link.close()
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
