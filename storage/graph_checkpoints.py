"""Rows of LangGraph checkpoints (tables of migration 0003), on either backend.

Storage knows nothing of LangGraph: it keeps opaque serialized values keyed the
way a checkpointer looks them up (runner/integrations/langgraph.py gives them
meaning). Each operation is written once, as a generator of SQL statements
that receives each statement's rows back, and a backend runs it in one
transaction of its own: asyncpg awaits each statement, SQLite runs the whole
generator on its worker thread inside BEGIN IMMEDIATE, so no other statement
of this process can slip into the transaction.

A write may be fenced: given ``(run_id, epoch)`` its transaction first locks
the run's row and refuses the write (StaleEpoch) unless that epoch owns the
run, exactly like a step write (storage._common.fence).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from raftmesh.storage._common import Row, fence
from raftmesh.storage.base import Store

T = TypeVar("T")
Dialect = Literal["postgres", "sqlite"]
# SQL with $1, $2 ... placeholders (SQLite reads them as ?1, ?2 ...), and its arguments.
Statement = tuple[str, tuple[Any, ...]]
Op = Generator[Statement, list[Row], T]

_CHECKPOINT_COLUMNS = (
    "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, graph_run_id,"
    " checkpoint_type, checkpoint, metadata_type, metadata"
)
_BLOB_COLUMNS = "thread_id, checkpoint_ns, channel, version, value_type, value"
_WRITE_COLUMNS = (
    "thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, value_type, value, task_path"
)
# Checkpoint ids are UUIDv6 text: byte order is time order, whatever the locale.
_NEWEST_FIRST = 'ORDER BY checkpoint_id COLLATE "C" DESC'


@dataclass(frozen=True)
class Fence:
    """The run and epoch a write must belong to."""

    run_id: str
    epoch: int


@dataclass(frozen=True)
class CheckpointRow:
    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_checkpoint_id: str | None
    graph_run_id: str | None
    checkpoint_type: str
    checkpoint: bytes
    metadata_type: str
    metadata: bytes


@dataclass(frozen=True)
class BlobRow:
    channel: str
    version: str
    value_type: str
    value: bytes


@dataclass(frozen=True)
class WriteRow:
    task_id: str
    idx: int
    channel: str
    value_type: str
    value: bytes
    task_path: str


class GraphCheckpoints:
    """The checkpoint tables of one open Store (PostgresStore or SqliteStore)."""

    def __init__(self, store: Store) -> None:
        from raftmesh.storage.postgres import PostgresStore
        from raftmesh.storage.sqlite import SqliteStore

        # A peer's store may be wrapped (mesh/timed_store.py times its calls).
        store = getattr(store, "wrapped", store)
        if isinstance(store, PostgresStore):
            self.dialect: Dialect = "postgres"
        elif isinstance(store, SqliteStore):
            self.dialect = "sqlite"
        else:
            raise TypeError(f"no checkpoint tables on {type(store).__name__}")
        self._store = store
        # The store's own setting, so the chaos checker's unsafe mode
        # (unsafe_disable_fencing) lets stale checkpoints through like stale steps.
        self._fencing: bool = store._fencing

    async def _run(self, op: Op[T], write: bool) -> T:
        if self.dialect == "postgres":
            return await _run_postgres(self._store, op)
        return await _run_sqlite(self._store, op, write)

    # -- writes -------------------------------------------------------------

    async def put_checkpoint(
        self, row: CheckpointRow, blobs: Sequence[BlobRow], fenced: Fence | None
    ) -> None:
        def op() -> Op[None]:
            yield from self._fence(fenced)
            for blob in blobs:
                yield (
                    f"INSERT INTO graph_blobs ({_BLOB_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
                    " ON CONFLICT DO NOTHING",
                    (row.thread_id, row.checkpoint_ns, blob.channel, blob.version)
                    + (blob.value_type, blob.value),
                )
            yield (
                f"INSERT INTO graph_checkpoints ({_CHECKPOINT_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                " ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET"
                " parent_checkpoint_id = excluded.parent_checkpoint_id,"
                " graph_run_id = excluded.graph_run_id,"
                " checkpoint_type = excluded.checkpoint_type, checkpoint = excluded.checkpoint,"
                " metadata_type = excluded.metadata_type, metadata = excluded.metadata",
                (row.thread_id, row.checkpoint_ns, row.checkpoint_id, row.parent_checkpoint_id)
                + (row.graph_run_id, row.checkpoint_type, row.checkpoint)
                + (row.metadata_type, row.metadata),
            )

        await self._run(op(), write=True)

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[WriteRow],
        fenced: Fence | None,
    ) -> None:
        """A task's special writes (negative idx: errors, interrupts) replace
        earlier ones; its ordinary writes are kept as first written."""
        replace = (
            "DO UPDATE SET channel = excluded.channel, value_type = excluded.value_type,"
            " value = excluded.value, task_path = excluded.task_path"
        )

        def op() -> Op[None]:
            yield from self._fence(fenced)
            for w in writes:
                yield (
                    f"INSERT INTO graph_writes ({_WRITE_COLUMNS})"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                    " ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) "
                    + (replace if w.idx < 0 else "DO NOTHING"),
                    (thread_id, checkpoint_ns, checkpoint_id, w.task_id, w.idx, w.channel)
                    + (w.value_type, w.value, w.task_path),
                )

        await self._run(op(), write=True)

    async def delete_threads(self, thread_ids: Sequence[str], fenced: Fence | None) -> None:
        def op() -> Op[None]:
            yield from self._fence(fenced)
            for thread_id in thread_ids:
                for table in ("graph_checkpoints", "graph_blobs", "graph_writes"):
                    yield (f"DELETE FROM {table} WHERE thread_id = $1", (thread_id,))

        await self._run(op(), write=True)

    async def delete_for_runs(self, run_ids: Sequence[str], fenced: Fence | None) -> None:
        """Checkpoints whose metadata names one of ``run_ids``, with their writes."""

        def op() -> Op[None]:
            yield from self._fence(fenced)
            for run_id in run_ids:
                yield (
                    "DELETE FROM graph_writes WHERE EXISTS (SELECT 1 FROM graph_checkpoints c"
                    " WHERE c.graph_run_id = $1 AND c.thread_id = graph_writes.thread_id"
                    " AND c.checkpoint_ns = graph_writes.checkpoint_ns"
                    " AND c.checkpoint_id = graph_writes.checkpoint_id)",
                    (run_id,),
                )
                yield ("DELETE FROM graph_checkpoints WHERE graph_run_id = $1", (run_id,))

        await self._run(op(), write=True)

    async def copy_thread(self, source: str, target: str, fenced: Fence | None) -> None:
        def op() -> Op[None]:
            yield from self._fence(fenced)
            for table, columns in (
                ("graph_checkpoints", _CHECKPOINT_COLUMNS),
                ("graph_blobs", _BLOB_COLUMNS),
                ("graph_writes", _WRITE_COLUMNS),
            ):
                rest = columns.partition(", ")[2]
                yield (
                    f"INSERT INTO {table} ({columns}) SELECT $2, {rest} FROM {table}"
                    " WHERE thread_id = $1 ON CONFLICT DO NOTHING",
                    (source, target),
                )

        await self._run(op(), write=True)

    async def keep_latest(self, thread_ids: Sequence[str], fenced: Fence | None) -> None:
        """Drop every checkpoint but the newest of each namespace, with its writes."""

        def op() -> Op[None]:
            yield from self._fence(fenced)
            older = (
                " EXISTS (SELECT 1 FROM graph_checkpoints n WHERE n.thread_id = t.thread_id"
                " AND n.checkpoint_ns = t.checkpoint_ns"
                ' AND n.checkpoint_id COLLATE "C" > t.checkpoint_id COLLATE "C")'
            )
            for thread_id in thread_ids:
                yield (
                    "DELETE FROM graph_writes AS t WHERE thread_id = $1 AND" + older,
                    (thread_id,),
                )
                yield (
                    "DELETE FROM graph_checkpoints AS t WHERE thread_id = $1 AND" + older,
                    (thread_id,),
                )

        await self._run(op(), write=True)

    def _fence(self, fenced: Fence | None) -> Generator[Statement, list[Row], None]:
        if fenced is None:
            return
        lock = " FOR UPDATE" if self.dialect == "postgres" else ""
        rows = yield (f"SELECT epoch, status FROM runs WHERE id = $1{lock}", (fenced.run_id,))
        fence(fenced.run_id, fenced.epoch, rows[0] if rows else None, self._fencing)

    # -- reads --------------------------------------------------------------

    async def get_checkpoint(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> CheckpointRow | None:
        rows = await self.list_checkpoints(thread_id, checkpoint_ns, checkpoint_id, None, 1)
        return rows[0] if rows else None

    async def list_checkpoints(
        self,
        thread_id: str | None,
        checkpoint_ns: str | None,
        checkpoint_id: str | None,
        before_id: str | None,
        limit: int | None,
    ) -> list[CheckpointRow]:
        """Newest first; None leaves that criterion out."""
        where: list[str] = []
        args: list[Any] = []
        for column, value, test in (
            ("thread_id", thread_id, "="),
            ("checkpoint_ns", checkpoint_ns, "="),
            ("checkpoint_id", checkpoint_id, "="),
            ("checkpoint_id", before_id, "<"),
        ):
            if value is not None:
                args.append(value)
                collate = ' COLLATE "C"' if test == "<" else ""
                where.append(f"{column}{collate} {test} ${len(args)}{collate}")
        sql = f"SELECT {_CHECKPOINT_COLUMNS} FROM graph_checkpoints"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " " + _NEWEST_FIRST
        if limit is not None:
            args.append(limit)
            sql += f" LIMIT ${len(args)}"

        def op() -> Op[list[CheckpointRow]]:
            rows = yield (sql, tuple(args))
            return [_checkpoint_row(r) for r in rows]

        return await self._run(op(), write=False)

    async def blobs(
        self, thread_id: str, checkpoint_ns: str, versions: Sequence[tuple[str, str]]
    ) -> list[BlobRow]:
        def op() -> Op[list[BlobRow]]:
            found: list[BlobRow] = []
            for channel, version in versions:
                rows = yield (
                    "SELECT channel, version, value_type, value FROM graph_blobs"
                    " WHERE thread_id = $1 AND checkpoint_ns = $2 AND channel = $3"
                    " AND version = $4",
                    (thread_id, checkpoint_ns, channel, version),
                )
                found.extend(
                    BlobRow(r["channel"], r["version"], r["value_type"], bytes(r["value"]))
                    for r in rows
                )
            return found

        return await self._run(op(), write=False)

    async def writes(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str
    ) -> list[WriteRow]:
        def op() -> Op[list[WriteRow]]:
            rows = yield (
                "SELECT task_id, idx, channel, value_type, value, task_path FROM graph_writes"
                " WHERE thread_id = $1 AND checkpoint_ns = $2 AND checkpoint_id = $3"
                ' ORDER BY task_path COLLATE "C", task_id COLLATE "C", idx',
                (thread_id, checkpoint_ns, checkpoint_id),
            )
            return [
                WriteRow(
                    r["task_id"],
                    r["idx"],
                    r["channel"],
                    r["value_type"],
                    bytes(r["value"]),
                    r["task_path"],
                )
                for r in rows
            ]

        return await self._run(op(), write=False)


def _checkpoint_row(r: Row) -> CheckpointRow:
    return CheckpointRow(
        thread_id=r["thread_id"],
        checkpoint_ns=r["checkpoint_ns"],
        checkpoint_id=r["checkpoint_id"],
        parent_checkpoint_id=r["parent_checkpoint_id"],
        graph_run_id=r["graph_run_id"],
        checkpoint_type=r["checkpoint_type"],
        checkpoint=bytes(r["checkpoint"]),
        metadata_type=r["metadata_type"],
        metadata=bytes(r["metadata"]),
    )


async def _run_postgres(store: Any, op: Op[T]) -> T:
    async with store._transaction() as conn:
        try:
            sql, args = next(op)
            while True:
                rows: list[Row] = list(await conn.fetch(sql, *args))
                sql, args = op.send(rows)
        except StopIteration as done:
            return done.value


async def _run_sqlite(store: Any, op: Op[T], write: bool) -> T:
    def work(conn: sqlite3.Connection) -> T:
        try:
            sql, args = next(op)
            while True:
                # SQLite's default collation already is byte order, and it
                # numbers parameters ?1, ?2 ...
                text = sql.replace(' COLLATE "C"', "").replace("$", "?")
                rows: list[Row] = conn.execute(text, args).fetchall()
                sql, args = op.send(rows)
        except StopIteration as done:
            return done.value

    result: T = await (store._write(work) if write else store._read(work))
    return result
