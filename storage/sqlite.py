"""SQLite backend: the embedded default for a mesh whose peers share one host.

Several peer processes may open the same file. WAL lets readers run beside
the one writer; every write transaction starts with BEGIN IMMEDIATE, which
takes the write lock up front and waits for it (busy_timeout) rather than
failing with "database is locked" when a read transaction would have to be
upgraded. Holding that lock is also what makes fencing atomic: the epoch
check and the write happen while no other process can claim the run.

sqlite3 blocks, so one connection lives on one dedicated worker thread and the
event loop hands it work through run_in_executor; a single thread also keeps
this process's statements in order.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from raftmesh.consensus.status import DEAD_LETTER_STATUSES, TERMINAL_STATUSES
from raftmesh.storage._common import (
    RUN_COLUMNS,
    fence,
    fence_result,
    require_terminal,
    run_filters,
    run_from_row,
    spec_values,
)
from raftmesh.storage.base import (
    Claim,
    Event,
    RunRow,
    SignalRow,
    SignalStored,
    StaleEpoch,
    Step,
    StorageUnavailable,
)
from raftmesh.storage.migrate import migrate_sqlite

T = TypeVar("T")

_BUSY_TIMEOUT_MS = 10_000
_WAL_RETRY_S = 0.01
_TERMINAL = sorted(TERMINAL_STATUSES)
_TERMINAL_PLACEHOLDERS = ", ".join("?" * len(_TERMINAL))

# Primary result codes that mean "not now" rather than "wrong statement":
# BUSY/LOCKED outlasted busy_timeout, or the file cannot be opened or written.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)

_INSERT_RUN = """
INSERT INTO runs (id, agent, input, tenant, priority, labels, timeout_s, max_attempts,
                  idempotency_key, parent_id, options, submitted_at_ms, status, owner, epoch,
                  attempts, started_at_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO NOTHING
"""


class SqliteStore:
    """Store in one SQLite file, shared safely by several processes on one host."""

    def __init__(self, path: str, *, fencing: bool = True) -> None:
        self._path = path
        # False only in the unsafe debug mode; see storage._common.fence.
        self._fencing = fencing
        self._executor: ThreadPoolExecutor | None = None
        # Created, used and closed only on the executor's thread.
        self._conn: sqlite3.Connection | None = None

    @property
    def path(self) -> str:
        """The database file, as given (relative paths resolve against the working directory)."""
        return self._path

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raftmesh-sqlite")
        try:
            await self._call(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _open_sync(self) -> None:
        # timeout is SQLite's busy_timeout. isolation_level=None stops the
        # module from opening transactions behind our back, so the explicit
        # BEGIN IMMEDIATE of every write is the only way one starts.
        conn = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            _enable_wal(conn)
            # FULL syncs the WAL on every commit: an acknowledged checkpoint or
            # result survives power loss, not just a process crash.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate_sqlite(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=False)

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def notifier(self) -> None:
        """No notifications between processes: watchers re-read instead."""
        return None

    async def ping(self) -> None:
        # SELECT 1 never touches the file; reading a table starts a real read
        # transaction, which fails if the file has become unreadable.
        await self._read(
            lambda conn: conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        )

    async def record_runs(self, runs: list[RunRow]) -> None:
        if not runs:
            return
        rows = [
            (run.id, *spec_values(run.spec), run.submitted_at_ms, "queued", None, 0, 0, None)
            for run in runs
        ]
        await self._write(lambda conn: conn.executemany(_INSERT_RUN, rows))

    async def claim(self, run: RunRow, epoch: int, peer: str, now_ms: int) -> Claim:
        def work(conn: sqlite3.Connection) -> Claim:
            stored = conn.execute(
                "SELECT epoch, status FROM runs WHERE id = ?", (run.id,)
            ).fetchone()
            if stored is None:
                conn.execute(
                    _INSERT_RUN,
                    (
                        run.id,
                        *spec_values(run.spec),
                        run.submitted_at_ms,
                        "running",
                        peer,
                        epoch,
                        1,
                        now_ms,
                    ),
                )
            elif stored["epoch"] >= epoch:
                raise StaleEpoch(run.id, epoch, stored["epoch"])
            elif stored["status"] in TERMINAL_STATUSES:
                # Keep the outcome; taking the epoch still fences its writer.
                conn.execute(
                    "UPDATE runs SET epoch = ?, owner = ? WHERE id = ?", (epoch, peer, run.id)
                )
            else:
                conn.execute(
                    "UPDATE runs SET epoch = ?, owner = ?, status = 'running',"
                    " attempts = attempts + 1, started_at_ms = ? WHERE id = ?",
                    (epoch, peer, now_ms, run.id),
                )
            row = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run.id,)).fetchone()
            claimed = run_from_row(row)
            return Claim(claimed, finished=claimed.status in TERMINAL_STATUSES)

        return await self._write(work)

    async def put_step(
        self, run_id: str, epoch: int, seq: int, name: str, value: bytes, peer: str, now_ms: int
    ) -> None:
        def work(conn: sqlite3.Connection) -> None:
            fence(run_id, epoch, _stored_run(conn, run_id), self._fencing)
            conn.execute(
                "INSERT INTO steps (run_id, seq, name, value, epoch, peer, at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, seq) DO NOTHING",
                (run_id, seq, name, value, epoch, peer, now_ms),
            )

        await self._write(work)

    async def load_steps(self, run_id: str) -> list[Step]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT seq, name, value, epoch, peer, at_ms FROM steps WHERE run_id = ? ORDER BY seq",
                (run_id,),
            ).fetchall()
        )
        return [
            Step(r["seq"], r["name"], bytes(r["value"]), r["epoch"], r["peer"], r["at_ms"])
            for r in rows
        ]

    async def append_event(
        self, run_id: str, epoch: int, kind: str, data: bytes, now_ms: int
    ) -> int:
        def work(conn: sqlite3.Connection) -> int:
            fence(run_id, epoch, _stored_run(conn, run_id), self._fencing)
            (seq,) = conn.execute(
                "INSERT INTO events (run_id, seq, kind, data, epoch, at_ms)"
                " SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ?, ? FROM events WHERE run_id = ?"
                " RETURNING seq",
                (run_id, kind, data, epoch, now_ms, run_id),
            ).fetchone()
            return int(seq)

        return await self._write(work)

    async def read_events(self, run_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT run_id, seq, kind, data, epoch, at_ms FROM events"
                " WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, after_seq, limit),
            ).fetchall()
        )
        return [
            Event(r["run_id"], r["seq"], r["kind"], bytes(r["data"]), r["epoch"], r["at_ms"])
            for r in rows
        ]

    async def put_result(
        self,
        run_id: str,
        epoch: int,
        status: str,
        result: bytes | None,
        error: str | None,
        now_ms: int,
    ) -> None:
        require_terminal(status)

        def work(conn: sqlite3.Connection) -> None:
            fence_result(run_id, epoch, _stored_run(conn, run_id), self._fencing)
            conn.execute(
                "UPDATE runs SET status = ?, result = ?, error = ?, finished_at_ms = ? WHERE id = ?",
                (status, result, error, now_ms, run_id),
            )

        await self._write(work)

    async def set_terminal(self, run_id: str, status: str, error: str | None, now_ms: int) -> None:
        require_terminal(status)
        await self._write(
            lambda conn: conn.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at_ms = ?"
                f" WHERE id = ? AND status NOT IN ({_TERMINAL_PLACEHOLDERS})",
                (status, error, now_ms, run_id, *_TERMINAL),
            )
        )

    async def reopen(self, run_id: str) -> bool:
        statuses = sorted(DEAD_LETTER_STATUSES)
        cursor = await self._write(
            lambda conn: conn.execute(
                "UPDATE runs SET status = 'queued', result = NULL, error = NULL,"
                f" finished_at_ms = NULL WHERE id = ? AND status IN ({', '.join('?' * len(statuses))})",
                (run_id, *statuses),
            )
        )
        return cursor.rowcount > 0

    async def get_run(self, run_id: str) -> RunRow | None:
        row = await self._read(
            lambda conn: conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
        )
        return None if row is None else run_from_row(row)

    async def list_runs(
        self,
        status: str | None = None,
        limit: int = 100,
        *,
        tenant: str | None = None,
        agent: str | None = None,
        offset: int = 0,
    ) -> list[RunRow]:
        where, params = run_filters(status, tenant, agent, lambda i: "?")
        sql = (
            f"SELECT {RUN_COLUMNS} FROM runs {where} "
            "ORDER BY submitted_at_ms DESC, id DESC LIMIT ? OFFSET ?"
        )
        args = (*params, limit, offset)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [run_from_row(row) for row in rows]

    async def put_signal(
        self, run_id: str, name: str, data: bytes, idempotency_key: str | None, at_ms: int
    ) -> SignalStored:
        def work(conn: sqlite3.Connection) -> SignalStored:
            # BEGIN IMMEDIATE holds the write lock: no other writer between the
            # key lookup, MAX(seq) and the insert.
            if idempotency_key is not None:
                known = conn.execute(
                    "SELECT seq FROM signals WHERE run_id = ? AND name = ? AND idempotency_key = ?",
                    (run_id, name, idempotency_key),
                ).fetchone()
                if known is not None:
                    return SignalStored(int(known[0]), created=False)
            (seq,) = conn.execute(
                "INSERT INTO signals (run_id, name, seq, data, idempotency_key, at_ms)"
                " SELECT ?, ?, COALESCE(MAX(seq), -1) + 1, ?, ?, ? FROM signals"
                " WHERE run_id = ? AND name = ? RETURNING seq",
                (run_id, name, data, idempotency_key, at_ms, run_id, name),
            ).fetchone()
            return SignalStored(int(seq), created=True)

        return await self._write(work)

    async def get_signal(self, run_id: str, name: str, seq: int) -> bytes | None:
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT data FROM signals WHERE run_id = ? AND name = ? AND seq = ?",
                (run_id, name, seq),
            ).fetchone()
        )
        return None if row is None else bytes(row[0])

    async def list_signals(self, run_id: str) -> list[SignalRow]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT run_id, name, seq, data, idempotency_key, at_ms FROM signals"
                " WHERE run_id = ? ORDER BY name, seq",
                (run_id,),
            ).fetchall()
        )
        return [
            SignalRow(
                r["run_id"], r["name"], r["seq"], bytes(r["data"]), r["idempotency_key"], r["at_ms"]
            )
            for r in rows
        ]

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in autocommit mode: each statement sees the latest commit."""
        return await self._call(lambda: work(self._connection()))

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one BEGIN IMMEDIATE transaction; any exception rolls it back."""

        def transaction() -> T:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                # Some errors (SQLITE_FULL, IOERR) have already rolled back.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return await self._call(transaction)

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            # Reported as unavailability so that work racing a shutdown backs off
            # like it would for a lost database.
            raise StorageUnavailable(f"SQLite store {self._path} is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in _UNAVAILABLE_CODES:
                raise StorageUnavailable(f"SQLite {self._path} unavailable: {exc}") from exc
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageUnavailable(f"SQLite store {self._path} is not open")
        return self._conn


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL, retrying while another process holds it.

    Changing the journal mode needs an exclusive lock and SQLite reports BUSY
    at once instead of calling the busy handler, so peers that create the file
    at the same moment would otherwise fail to start. WAL is persistent: only
    the first open of a new file has anything to switch.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(_WAL_RETRY_S)


def _stored_run(conn: sqlite3.Connection, run_id: str) -> sqlite3.Row | None:
    # Inside BEGIN IMMEDIATE this read is as good as a row lock: no other
    # connection can write until we commit.
    return conn.execute("SELECT epoch, status FROM runs WHERE id = ?", (run_id,)).fetchone()
