"""Types and constants the storage tests share with their fixtures."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from raftmesh.storage import Store

PG_URL = os.environ.get("RAFTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Target:
    """Where one test's store lives, plus a raw look at it that bypasses the store."""

    url: str
    sqlite_path: Path | None = None
    pg_schema: str | None = None

    async def applied_versions(self) -> list[int]:
        sql = "SELECT version FROM schema_migrations ORDER BY version"
        if self.sqlite_path is not None:
            with closing(sqlite3.connect(self.sqlite_path)) as conn:
                return [version for (version,) in conn.execute(sql)]
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": f'"{self.pg_schema}"'})
        try:
            return [row["version"] for row in await conn.fetch(sql)]
        finally:
            await conn.close()


MakeStore = Callable[[str], Awaitable[Store]]
