"""Versioned schema migrations, applied by every store at open().

Peers start at the same time and each one migrates, so every runner holds a
database-wide lock (an advisory lock in PostgreSQL, the write lock in SQLite)
while it reads ``schema_migrations`` and applies what is missing: the first
peer migrates, the others wait and then find nothing left to do. Each run of
the runner is one transaction, so a crash mid-way leaves the previous version.

Files are ``migrations/<dialect>/NNNN_name.sql``; NNNN is the version. Shipped
files are never edited, a change is a new file.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import asyncpg

Dialect = Literal["postgres", "sqlite"]

_PG_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""

_SQLITE_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: Dialect) -> list[Migration]:
    """The shipped migrations of one dialect, oldest first.

    Read through importlib.resources so they are found in a wheel as well as
    in a source checkout.
    """
    folder = resources.files("raftmesh.storage").joinpath("migrations", dialect)
    migrations = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        prefix, _, rest = entry.name.partition("_")
        if not prefix.isdigit() or not rest:
            raise ValueError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        migrations.append(Migration(int(prefix), entry.name, entry.read_text(encoding="utf-8")))
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate {dialect} migration versions: {versions}")
    return migrations


def quote_ident(name: str) -> str:
    """Quote a PostgreSQL identifier (schema names come from a URL, not from us)."""
    return '"' + name.replace('"', '""') + '"'


async def migrate_postgres(conn: asyncpg.Connection, schema: str | None) -> list[int]:
    """Create ``schema`` if given, apply pending migrations; return the versions applied.

    The connection's search_path must already point at ``schema``. The lock
    key is per schema so that stores in different schemas do not queue behind
    each other; it is taken before CREATE SCHEMA because IF NOT EXISTS alone
    still fails when two sessions create the same schema at once.
    """
    async with conn.transaction():
        lock_key = f"raftmesh.migrate:{schema or ''}"
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock_key)
        if schema is not None:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        await conn.execute(_PG_CREATE_TABLE)
        applied = {
            row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")
        }
        done = []
        for migration in load_migrations("postgres"):
            if migration.version in applied:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)", migration.version
            )
            done.append(migration.version)
        return done


def migrate_sqlite(conn: sqlite3.Connection) -> list[int]:
    """Apply pending migrations on an autocommit connection; return the versions applied.

    BEGIN IMMEDIATE takes the write lock up front, so a second process that
    opens the same file waits (busy_timeout) instead of migrating twice.
    Statements are executed one by one because executescript() would commit
    the open transaction first.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_SQLITE_CREATE_TABLE)
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        done = []
        for migration in load_migrations("sqlite"):
            if migration.version in applied:
                continue
            for statement in _split_sqlite(migration.sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (migration.version,))
            done.append(migration.version)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return done


def _split_sqlite(script: str) -> list[str]:
    """Split a script into statements; sqlite3.complete_statement knows about quotes."""
    statements = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip() and not _only_comments(pending):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {pending!r}")
    return statements


def _only_comments(text: str) -> bool:
    return all(not line.strip() or line.lstrip().startswith("--") for line in text.splitlines())
