"""PostgreSQL backend: the store peers on many hosts share.

Fenced writes lock the run row and check the epoch in the same transaction as
the write, so a claim by a newer epoch either waits for an in-flight write to
commit or makes it fail; there is no window in which a deposed owner's write
lands after the claim. A step, an event and a result (the hot path) are one
statement each: the row lock, the epoch compare and the write in one round
trip. Steps that wait for a pool connection go together in one statement
(``GroupCommit``), and so do events, each still checked against its own run's
epoch.

An event's notification is not sent in the event's transaction: PostgreSQL
serialises every committing transaction that notified, across the whole
server, fsync included, and one per event capped the mesh at about a thousand
checkpoints a second (issue 12). Events' run ids are sent after their events
commit, many runs in one transaction, one such transaction in flight at a
time (``_Wakeups``); a wake-up lost to a crash in between is what the
watchers' periodic re-read is for.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

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
    Notifier,
    NotifyCallback,
    RunRow,
    SignalRow,
    SignalStored,
    StaleEpoch,
    Step,
    StorageUnavailable,
)
from raftmesh.storage.group_commit import GroupCommit
from raftmesh.storage.migrate import migrate_postgres, quote_ident

log = logging.getLogger(__name__)

_POOL_MIN_SIZE = 1
_POOL_MAX_SIZE = 8
_CONNECT_TIMEOUT_S = 10.0
# Bounds how long a partitioned database can hold a caller; every statement
# here touches one run and finishes in milliseconds when the server is healthy.
_COMMAND_TIMEOUT_S = 30.0
_CLOSE_TIMEOUT_S = 5.0
_RELISTEN_MAX_DELAY_S = 2.0
# A step (an event) goes alone while fewer than a pool's worth of steps
# (events) are in flight; those that wait go together, this many at most in
# one statement.
_STEP_BATCH_MAX = 256
_CHANNEL_PREFIX = "raftmesh_events_"
# Run ids one notifying transaction carries at most.
_WAKEUPS_MAX = 1000
_MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer channel names are refused.
_TERMINAL = sorted(TERMINAL_STATUSES)

# Errors that say "the server is not reachable right now", as opposed to a
# bug in a statement: callers may retry these later.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes TimeoutError from connect and command timeouts
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
)

_INSERT_QUEUED = """
INSERT INTO runs (id, agent, input, tenant, priority, labels, timeout_s, max_attempts,
                  idempotency_key, parent_id, options, submitted_at_ms, status, epoch, attempts)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11::jsonb, $12, 'queued', 0, 0)
ON CONFLICT (id) DO NOTHING
"""

# A terminal row keeps status, result, attempts and started_at but still takes
# the new epoch and owner, so the epoch that wrote the result is fenced too.
_CLAIM = f"""
INSERT INTO runs (id, agent, input, tenant, priority, labels, timeout_s, max_attempts,
                  idempotency_key, parent_id, options, submitted_at_ms, status, owner, epoch,
                  attempts, started_at_ms)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11::jsonb, $12, 'running', $13, $14, 1,
        $15)
ON CONFLICT (id) DO UPDATE SET
    epoch = excluded.epoch,
    owner = excluded.owner,
    status = CASE WHEN runs.status = ANY($16::text[]) THEN runs.status ELSE 'running' END,
    attempts = CASE WHEN runs.status = ANY($16::text[])
                    THEN runs.attempts ELSE runs.attempts + 1 END,
    started_at_ms = CASE WHEN runs.status = ANY($16::text[])
                         THEN runs.started_at_ms ELSE excluded.started_at_ms END
WHERE runs.epoch < excluded.epoch
RETURNING {RUN_COLUMNS}
"""

# One statement: the run row is locked (a claim's update conflicts with the
# share lock, and a locking read returns the newest committed version), and the
# step is inserted only if the locked epoch is the writer's ($8: fencing on).
# It answers the locked epoch, or no row for a run never claimed.
_PUT_STEP = """
WITH owner AS (SELECT epoch FROM runs WHERE id = $1 FOR SHARE),
written AS (
    INSERT INTO steps (run_id, seq, name, value, epoch, peer, at_ms)
    SELECT $1, $2, $3, $4, $5, $6, $7 FROM owner WHERE owner.epoch = $5 OR NOT $8
    ON CONFLICT (run_id, seq) DO NOTHING
)
SELECT epoch, NULL AS status FROM owner
"""

# _PUT_STEP for the steps of many runs (group commit), locked in id order, so
# two batches never wait on each other in a cycle. It answers every step's
# locked epoch in the order given, NULL for a run never claimed.
_PUT_STEPS = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::bytea[], $5::bigint[],
                         $6::text[], $7::bigint[])
        WITH ORDINALITY AS b(run_id, seq, name, value, epoch, peer, at_ms, i)
),
owner AS (
    SELECT id, epoch FROM runs WHERE id IN (SELECT run_id FROM batch) ORDER BY id FOR SHARE
),
written AS (
    INSERT INTO steps (run_id, seq, name, value, epoch, peer, at_ms)
    SELECT b.run_id, b.seq, b.name, b.value, b.epoch, b.peer, b.at_ms
    FROM batch b JOIN owner o ON o.id = b.run_id
    WHERE o.epoch = b.epoch OR NOT $8
    ON CONFLICT (run_id, seq) DO NOTHING
)
SELECT o.epoch FROM batch b LEFT JOIN owner o ON o.id = b.run_id ORDER BY b.i
"""

# One statement, as _PUT_STEP: the outcome is written only if the locked row
# is the writer's epoch ($6, when $7: fencing on) and holds no outcome yet; it
# answers the row as locked, before the write, for storage._common.fence_result.
_PUT_RESULT = """
WITH locked AS (SELECT epoch, status FROM runs WHERE id = $1 FOR UPDATE),
written AS (
    UPDATE runs SET status = $2, result = $3, error = $4, finished_at_ms = $5
    FROM locked
    WHERE runs.id = $1 AND (locked.epoch = $6 OR NOT $7) AND locked.status <> ALL($8::text[])
)
SELECT epoch, status FROM locked
"""

# One statement, as _PUT_STEP: the run row is locked and the event inserted
# only if the locked epoch is the writer's ($4, when $6: fencing on).
# MAX(seq) reads the statement's snapshot, taken before the row lock was
# granted: a writer of the same epoch that committed while this one waited for
# the lock is not seen, the insert conflicts, and the answer's seq is NULL.
_APPEND_EVENT = """
WITH locked AS (SELECT epoch FROM runs WHERE id = $1 FOR UPDATE),
written AS (
    INSERT INTO events (run_id, seq, kind, data, epoch, at_ms)
    SELECT $1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id = $1), $2, $3, $4, $5
    FROM locked WHERE locked.epoch = $4 OR NOT $6
    ON CONFLICT (run_id, seq) DO NOTHING
    RETURNING seq
)
SELECT locked.epoch, (SELECT seq FROM written) AS seq FROM locked
"""

# _APPEND_EVENT for the events of many runs (group commit), rows locked in id
# order as in _PUT_STEPS. Each event gets its run's MAX(seq) plus its place
# among the batch's events of that run. It answers every event's locked epoch
# and the seq it was stored under (NULL: refused, or it lost the race above).
_APPEND_EVENTS = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::bigint[])
        WITH ORDINALITY AS b(run_id, kind, data, epoch, at_ms, i)
),
locked AS (
    SELECT id, epoch FROM runs WHERE id IN (SELECT run_id FROM batch) ORDER BY id FOR UPDATE
),
numbered AS (
    SELECT b.*,
           COALESCE((SELECT MAX(seq) FROM events e WHERE e.run_id = b.run_id), 0)
           + row_number() OVER (PARTITION BY b.run_id ORDER BY b.i) AS seq
    FROM batch b JOIN locked l ON l.id = b.run_id
    WHERE l.epoch = b.epoch OR NOT $6
),
written AS (
    INSERT INTO events (run_id, seq, kind, data, epoch, at_ms)
    SELECT run_id, seq, kind, data, epoch, at_ms FROM numbered
    ON CONFLICT (run_id, seq) DO NOTHING
    RETURNING run_id, seq
)
SELECT l.epoch, w.seq FROM batch b
LEFT JOIN locked l ON l.id = b.run_id
LEFT JOIN numbered n ON n.i = b.i
LEFT JOIN written w ON w.run_id = n.run_id AND w.seq = n.seq
ORDER BY b.i
"""

# The append that lost that race: the lock first, then MAX(seq) in a statement
# of its own, whose fresh snapshot (READ COMMITTED) sees every event committed
# by whoever held the row lock before.
_INSERT_EVENT = """
INSERT INTO events (run_id, seq, kind, data, epoch, at_ms)
SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5 FROM events WHERE run_id = $1
RETURNING seq
"""


class PostgresStore:
    """Store on PostgreSQL through an asyncpg pool.

    ``url`` is a libpq-style URL; an optional ``schema=NAME`` query parameter
    puts every table in that schema (created when absent), which lets several
    meshes or test runs share one database.
    """

    def __init__(self, url: str, *, fencing: bool = True) -> None:
        self._dsn, self._schema = _split_schema(url)
        # False only in the unsafe debug mode; see storage._common.fence.
        self._fencing = fencing
        self._server_settings = (
            {"search_path": quote_ident(self._schema)} if self._schema is not None else {}
        )
        self._channel = events_channel_name(self._schema or "public")
        self._wakeups = _Wakeups(self._notify)
        self._steps = GroupCommit(self._put_steps, _POOL_MAX_SIZE, _STEP_BATCH_MAX)
        self._events = GroupCommit(self._append_events, _POOL_MAX_SIZE, _STEP_BATCH_MAX)
        self._pool: asyncpg.Pool | None = None
        self._listeners: list[asyncpg.Connection] = []
        self._relisten_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def events_channel(self) -> str:
        """The NOTIFY channel append_event signals on; one per schema."""
        return self._channel

    async def open(self) -> None:
        with _translate_errors():
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=_POOL_MIN_SIZE,
                max_size=_POOL_MAX_SIZE,
                timeout=_CONNECT_TIMEOUT_S,
                command_timeout=_COMMAND_TIMEOUT_S,
                server_settings=self._server_settings,
                reset=_keep_session,
            )
            try:
                async with pool.acquire() as conn:
                    await migrate_postgres(conn, self._schema)
            except BaseException:
                pool.terminate()
                raise
        self._pool = pool
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        await self._wakeups.close()
        for task in self._relisten_tasks:
            task.cancel()
        await asyncio.gather(*self._relisten_tasks, return_exceptions=True)
        listeners, self._listeners = self._listeners, []
        for conn in listeners:
            try:
                await conn.close(timeout=_CLOSE_TIMEOUT_S)
            except _UNAVAILABLE_ERRORS:
                log.debug("listener connection was already gone at close", exc_info=True)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await pool.close()
        except TimeoutError:
            # A partitioned server never answers a graceful goodbye.
            pool.terminate()

    def notifier(self) -> Notifier:
        return self

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    async def record_runs(self, runs: list[RunRow]) -> None:
        if not runs:
            return
        async with self._connection() as conn:
            await conn.executemany(
                _INSERT_QUEUED,
                [(run.id, *spec_values(run.spec), run.submitted_at_ms) for run in runs],
            )

    async def claim(self, run: RunRow, epoch: int, peer: str, now_ms: int) -> Claim:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                _CLAIM,
                run.id,
                *spec_values(run.spec),
                run.submitted_at_ms,
                peer,
                epoch,
                now_ms,
                _TERMINAL,
            )
            if row is None:
                current = await conn.fetchval("SELECT epoch FROM runs WHERE id = $1", run.id)
                raise StaleEpoch(run.id, epoch, current)
        stored = run_from_row(row)
        return Claim(stored, finished=stored.status in TERMINAL_STATUSES)

    async def put_step(
        self, run_id: str, epoch: int, seq: int, name: str, value: bytes, peer: str, now_ms: int
    ) -> None:
        locked = await self._steps.write((run_id, seq, name, value, epoch, peer, now_ms))
        fence(run_id, epoch, None if locked is None else {"epoch": locked}, self._fencing)

    async def _put_steps(self, steps: list[tuple[Any, ...]]) -> list[int | None]:
        async with self._connection() as conn:
            if len(steps) == 1:
                row = await conn.fetchrow(_PUT_STEP, *steps[0], self._fencing)
                return [None if row is None else row["epoch"]]
            rows = await conn.fetch(_PUT_STEPS, *zip(*steps, strict=True), self._fencing)
        return [row["epoch"] for row in rows]

    async def load_steps(self, run_id: str) -> list[Step]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT seq, name, value, epoch, peer, at_ms FROM steps WHERE run_id = $1 ORDER BY seq",
                run_id,
            )
        return [
            Step(r["seq"], r["name"], bytes(r["value"]), r["epoch"], r["peer"], r["at_ms"])
            for r in rows
        ]

    async def append_event(
        self, run_id: str, epoch: int, kind: str, data: bytes, now_ms: int
    ) -> int:
        locked, seq = await self._events.write((run_id, kind, data, epoch, now_ms))
        fence(run_id, epoch, None if locked is None else {"epoch": locked}, self._fencing)
        if seq is None:
            # Two writers of one run at once: the runner sends one append of a
            # run at a time, so this is another peer's writer, or a retry after
            # an outage.
            async with self._transaction() as conn:
                fence(run_id, epoch, await _lock_run(conn, run_id), self._fencing)
                seq = await conn.fetchval(_INSERT_EVENT, run_id, kind, data, epoch, now_ms)
        self._wakeups.add(run_id)
        return int(seq)

    async def _append_events(
        self, events: list[tuple[Any, ...]]
    ) -> list[tuple[int | None, int | None]]:
        async with self._connection() as conn:
            if len(events) == 1:
                row = await conn.fetchrow(_APPEND_EVENT, *events[0], self._fencing)
                return [(None, None) if row is None else (row["epoch"], row["seq"])]
            rows = await conn.fetch(_APPEND_EVENTS, *zip(*events, strict=True), self._fencing)
        return [(row["epoch"], row["seq"]) for row in rows]

    async def read_events(self, run_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT run_id, seq, kind, data, epoch, at_ms FROM events"
                " WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                run_id,
                after_seq,
                limit,
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
        async with self._connection() as conn:
            locked = await conn.fetchrow(
                _PUT_RESULT, run_id, status, result, error, now_ms, epoch, self._fencing, _TERMINAL
            )
        fence_result(run_id, epoch, locked, self._fencing)

    async def set_terminal(self, run_id: str, status: str, error: str | None, now_ms: int) -> None:
        require_terminal(status)
        async with self._connection() as conn:
            # The row lock taken by UPDATE re-checks the WHERE against a
            # concurrent put_result, so a just-written outcome is never replaced.
            await conn.execute(
                "UPDATE runs SET status = $2, error = $3, finished_at_ms = $4"
                " WHERE id = $1 AND status <> ALL($5::text[])",
                run_id,
                status,
                error,
                now_ms,
                _TERMINAL,
            )

    async def reopen(self, run_id: str) -> bool:
        async with self._connection() as conn:
            done = await conn.execute(
                "UPDATE runs SET status = 'queued', result = NULL, error = NULL,"
                " finished_at_ms = NULL WHERE id = $1 AND status = ANY($2::text[])",
                run_id,
                list(DEAD_LETTER_STATUSES),
            )
        return done != "UPDATE 0"

    async def get_run(self, run_id: str) -> RunRow | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = $1", run_id)
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
        where, params = run_filters(status, tenant, agent, lambda i: f"${i}")
        n = len(params)
        sql = (
            f"SELECT {RUN_COLUMNS} FROM runs {where} "
            f"ORDER BY submitted_at_ms DESC, id DESC LIMIT ${n + 1} OFFSET ${n + 2}"
        )
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params, limit, offset)
        return [run_from_row(row) for row in rows]

    async def put_signal(
        self, run_id: str, name: str, data: bytes, idempotency_key: str | None, at_ms: int
    ) -> SignalStored:
        async with self._transaction() as conn:
            # One writer per (run, name) at a time: the key lookup and MAX(seq)
            # below then see every signal committed before, so seqs are dense
            # and a key races to one signal (a hash collision only serialises).
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('raftmesh.signal:' || $1 || '/' || $2))",
                run_id,
                name,
            )
            if idempotency_key is not None:
                seq = await conn.fetchval(
                    "SELECT seq FROM signals WHERE run_id = $1 AND name = $2"
                    " AND idempotency_key = $3",
                    run_id,
                    name,
                    idempotency_key,
                )
                if seq is not None:
                    return SignalStored(seq, created=False)
            seq = await conn.fetchval(
                "INSERT INTO signals (run_id, name, seq, data, idempotency_key, at_ms)"
                " SELECT $1, $2, COALESCE(MAX(seq), -1) + 1, $3, $4, $5 FROM signals"
                " WHERE run_id = $1 AND name = $2 RETURNING seq",
                run_id,
                name,
                data,
                idempotency_key,
                at_ms,
            )
        return SignalStored(seq, created=True)

    async def get_signal(self, run_id: str, name: str, seq: int) -> bytes | None:
        async with self._connection() as conn:
            data = await conn.fetchval(
                "SELECT data FROM signals WHERE run_id = $1 AND name = $2 AND seq = $3",
                run_id,
                name,
                seq,
            )
        return None if data is None else bytes(data)

    async def list_signals(self, run_id: str) -> list[SignalRow]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT run_id, name, seq, data, idempotency_key, at_ms FROM signals"
                " WHERE run_id = $1 ORDER BY name, seq",
                run_id,
            )
        return [
            SignalRow(
                r["run_id"], r["name"], r["seq"], bytes(r["data"]), r["idempotency_key"], r["at_ms"]
            )
            for r in rows
        ]

    async def _notify(self, run_ids: list[str]) -> None:
        """One transaction: one turn of the server-wide lock for every run id
        (the payload stays one run id, as listeners of every release read it)."""
        async with self._connection() as conn:
            await conn.execute(
                "SELECT pg_notify($1, run_id) FROM unnest($2::text[]) AS run_id",
                self._channel,
                run_ids,
            )

    def pool_in_use(self) -> tuple[int, int]:
        """(connections in use, pool size), for the storage pool gauge."""
        pool = self._pool
        if pool is None:
            return 0, 0
        size = pool.get_size()
        return size - pool.get_idle_size(), size

    async def listen(self, callback: NotifyCallback) -> None:
        """Call ``callback(run_id)`` whenever any peer appends an event to a run here.

        The listener holds a dedicated connection (pool connections drop their
        listeners when released) until close(). If that connection is lost it
        is re-established in the background; notifications sent meanwhile are
        lost, which is why watchers also re-read events periodically.
        """
        with _translate_errors():
            await self._add_listener(callback)

    async def _add_listener(self, callback: NotifyCallback) -> None:
        conn = await asyncpg.connect(
            self._dsn, timeout=_CONNECT_TIMEOUT_S, server_settings=self._server_settings
        )
        try:
            await conn.add_listener(
                self._channel, lambda _conn, _pid, _channel, run_id: callback(run_id)
            )
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(lambda lost: self._on_listener_lost(lost, callback))
        self._listeners.append(conn)

    def _on_listener_lost(self, conn: asyncpg.Connection, callback: NotifyCallback) -> None:
        if conn in self._listeners:
            self._listeners.remove(conn)
        if self._closed:
            return
        log.warning("lost the LISTEN connection for %s; reconnecting", self._channel)
        task = asyncio.get_running_loop().create_task(self._relisten(callback))
        self._relisten_tasks.add(task)
        task.add_done_callback(self._relisten_tasks.discard)

    async def _relisten(self, callback: NotifyCallback) -> None:
        delay_s = 0.1
        while True:
            try:
                await self._add_listener(callback)
            except _UNAVAILABLE_ERRORS:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _RELISTEN_MAX_DELAY_S)
            else:
                log.info("listening on %s again", self._channel)
                return

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        pool = self._require_pool()
        with _translate_errors():
            async with pool.acquire() as conn:
                yield conn

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    yield conn
            except asyncpg.exceptions.InterfaceError as exc:
                # The body lost the connection, so the block could not be rolled
                # back on it ("the underlying connection is closed"): nothing
                # was committed, and asyncpg's error hides the outage behind it.
                lost = exc.__context__
                if not isinstance(lost, _UNAVAILABLE_ERRORS):
                    raise
                raise StorageUnavailable(f"PostgreSQL unavailable: {lost!r}") from lost

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            # Reported as unavailability so that work racing a shutdown backs off
            # like it would for a lost database.
            raise StorageUnavailable("PostgreSQL store is not open")
        return self._pool


class _Wakeups:
    """Run ids whose events committed, sent to listeners in batches: whatever
    arrives while one batch is being sent goes in the next."""

    def __init__(self, send: Callable[[list[str]], Awaitable[None]]) -> None:
        self._send = send
        self._pending: dict[str, None] = {}  # insertion-ordered set
        self._sender: asyncio.Task[None] | None = None

    def add(self, run_id: str) -> None:
        self._pending[run_id] = None
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_all())

    async def _send_all(self) -> None:
        while self._pending:
            run_ids = list(self._pending)[:_WAKEUPS_MAX]
            for run_id in run_ids:
                del self._pending[run_id]
            try:
                await self._send(run_ids)
            except StorageUnavailable as exc:
                # The watchers' periodic re-read finds these events.
                log.debug("could not wake the watchers of %d runs: %s", len(run_ids), exc)
            except Exception:
                log.exception("could not wake the watchers of %d runs", len(run_ids))

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        self._pending.clear()


def events_channel_name(schema: str) -> str:
    """NOTIFY channel for a schema.

    Sanitised to [a-z0-9_] so it is a plain identifier, and cut to 63 bytes
    because LISTEN truncates and pg_notify refuses longer names. Two schemas
    that sanitise alike share a channel; that only costs spurious wake-ups.
    """
    name = _CHANNEL_PREFIX + re.sub(r"[^a-z0-9_]", "_", schema.lower())
    return name[:_MAX_IDENTIFIER_BYTES]


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release, instead of asyncpg's default query
    (unlock advisory locks, CLOSE ALL, UNLISTEN *, RESET ALL): one round trip
    per statement saved. None of it has anything to undo here: pool
    connections take only transaction-scoped advisory locks, open no cursor
    outside a transaction, never LISTEN (listeners have connections of their
    own) and set nothing for the session beyond the connect-time settings.
    asyncpg still rolls back a transaction left open before calling this."""


async def _lock_run(conn: asyncpg.Connection, run_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT epoch, status FROM runs WHERE id = $1 FOR UPDATE", run_id)


def _split_schema(url: str) -> tuple[str, str | None]:
    """Take the ``schema`` query parameter out of the URL (asyncpg would send it
    to the server as an unknown setting)."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in params if key == "schema"]
    if len(schemas) > 1 or (schemas and not schemas[0]):
        raise ValueError(f"expected at most one non-empty schema= parameter in {url!r}")
    rest = urlencode([(key, value) for key, value in params if key != "schema"])
    return urlunsplit(parts._replace(query=rest)), schemas[0] if schemas else None


@contextmanager
def _translate_errors() -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE_ERRORS as exc:
        raise StorageUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
