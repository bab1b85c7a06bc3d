"""The comparison systems, each run the same way: its worker in a subprocess
started here, its own schema (or Redis database), the same no-op task, N
submissions, and the clock read from what the system itself stored: first
submission to last stored finish, as for raftmesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from raftmesh.bench.env import BenchSetupError, RedisServer, schema
from raftmesh.bench.extra import require

# What each comparison needs from the bench extra, checked before it starts.
NEEDS = {
    "celery": ("celery", "redis"),
    "procrastinate": ("procrastinate", "psycopg"),
    "dbos": ("dbos",),
}


@dataclass(frozen=True)
class Outcome:
    system: str
    runs: int
    first_at: float  # wall clock, s
    last_finish: float  # wall clock, s
    checkpoints: int = 0

    @property
    def seconds(self) -> float:
        return self.last_finish - self.first_at

    @property
    def per_s(self) -> float:
        return self.runs / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def worker(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A worker subprocess, terminated (then killed) on the way out."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    except FileNotFoundError:
        return "(no log)"


async def celery(redis: RedisServer, workdir: Path, runs: int, timeout_s: float) -> Outcome:
    """Celery 5 with Redis as broker and result backend, acks_late, prefork x 3."""
    require("celery")
    redis_lib = require("redis")
    from raftmesh.bench.celery_app import make_app

    address = redis.start(workdir)
    # An empty numbered database of its own, flushed afterwards.
    db = _empty_redis_db(redis_lib, address)
    url = f"redis://{address}/{db}"
    queue = f"bench-{int(time.time() * 1000)}"
    app = make_app(url, queue)
    log = workdir / "celery-worker.log"
    client = redis_lib.Redis.from_url(url)
    try:
        with worker(["raftmesh.bench.celery_app", url, queue], log) as proc:
            deadline = time.monotonic() + 60
            while not app.control.ping(timeout=0.5):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchSetupError(f"the Celery worker did not start:\n{_tail(log)}")
            noop = app.tasks["noop"]

            def send() -> tuple[float, list[str]]:
                first_at = time.time()
                return first_at, [noop.apply_async().id for _ in range(runs)]

            first_at, ids = await asyncio.to_thread(send)
            keys = [f"celery-task-meta-{i}" for i in ids]
            deadline = time.monotonic() + timeout_s
            while True:
                metas = await asyncio.to_thread(client.mget, keys)
                if all(metas):
                    break
                if time.monotonic() > deadline:
                    done = sum(1 for m in metas if m)
                    raise TimeoutError(f"Celery finished {done} of {runs} in {timeout_s:g} s")
                await asyncio.sleep(0.05)
        last = max(_utc(json.loads(m)["date_done"]) for m in metas)
        return Outcome("Celery+Redis", runs, first_at, last)
    finally:
        client.flushdb()
        client.close()
        app.close()


def _empty_redis_db(redis_lib: Any, address: str) -> int:
    for db in range(15, 0, -1):
        conn = redis_lib.Redis.from_url(f"redis://{address}/{db}")
        try:
            if conn.dbsize() == 0:
                return db
        finally:
            conn.close()
    raise BenchSetupError(f"every Redis database 1..15 at {address} holds keys: none is free")


def _utc(iso: str) -> float:
    stamp = datetime.fromisoformat(iso)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


async def procrastinate(
    pg_url: str, workdir: Path, runs: int, in_flight: int, timeout_s: float
) -> Outcome:
    """procrastinate 3 on PostgreSQL (LISTEN/NOTIFY), one worker, concurrency 3."""
    require("procrastinate")
    require("psycopg")
    from raftmesh.bench.procrastinate_app import make_app

    async with schema(pg_url, "procrastinate") as name:
        app = make_app(pg_url, name)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            log = workdir / "procrastinate-worker.log"
            with worker(["raftmesh.bench.procrastinate_app", pg_url, name], log) as proc:
                await _wait_procrastinate_worker(pg_url, name, proc, log)
                task = app.tasks["noop"]
                counter = iter(range(runs))

                async def submit() -> None:
                    for _ in counter:
                        await task.defer_async()

                first_at = time.time()
                await asyncio.gather(*(submit() for _ in range(in_flight)))
                query = (
                    f'SELECT count(*), max(at) FROM "{name}".procrastinate_events '
                    "WHERE type = 'succeeded'"
                )
                done, last = await _poll_count(pg_url, query, runs, timeout_s, "procrastinate")
        return Outcome("procrastinate", runs, first_at, last.timestamp())


async def _wait_procrastinate_worker(
    pg_url: str, name: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    """The worker registers itself in procrastinate_workers once it listens."""
    deadline = time.monotonic() + 60
    while True:
        conn = await asyncpg.connect(pg_url)
        try:
            up = await conn.fetchval(f'SELECT count(*) FROM "{name}".procrastinate_workers')
        finally:
            await conn.close()
        if up:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchSetupError(f"the procrastinate worker did not start:\n{_tail(log)}")
        await asyncio.sleep(0.1)


async def _poll_count(
    pg_url: str, query: str, want: int, timeout_s: float, who: str
) -> tuple[int, Any]:
    deadline = time.monotonic() + timeout_s
    conn = await asyncpg.connect(pg_url)
    try:
        while True:
            done, last = await conn.fetchrow(query)
            if done >= want:
                return done, last
            if time.monotonic() > deadline:
                raise TimeoutError(f"{who} finished {done} of {want} in {timeout_s:g} s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def dbos(
    pg_url: str, workdir: Path, runs: int, steps: int, in_flight: int, timeout_s: float
) -> Outcome:
    """DBOS Transact: one process, ``in_flight`` threads each starting a workflow and
    waiting for it; ``steps`` checkpointed steps per workflow."""
    require("dbos")
    async with schema(pg_url, "dbos") as name:
        log = workdir / "dbos-app.log"
        argv = [sys.executable, "-m", "raftmesh.bench.dbos_app", pg_url, name]
        argv += [str(runs), str(steps), str(in_flight)]

        def run() -> subprocess.CompletedProcess[str]:
            with open(log, "a") as err:
                return subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    timeout=timeout_s + 60,
                )

        done = await asyncio.to_thread(run)
        if done.returncode != 0:
            raise BenchSetupError(f"the DBOS app failed ({done.returncode}):\n{_tail(log)}")
        first_at = json.loads(done.stdout.strip().splitlines()[-1])["first_at"]
        conn = await asyncpg.connect(pg_url)
        try:
            count, last_ms = await conn.fetchrow(
                f'SELECT count(*), max(updated_at) FROM "{name}".workflow_status '
                "WHERE status = 'SUCCESS'"
            )
            checkpoints = await conn.fetchval(f'SELECT count(*) FROM "{name}".operation_outputs')
        finally:
            await conn.close()
        if count < runs:
            raise BenchSetupError(f"DBOS stored {count} of {runs} workflows as SUCCESS")
        return Outcome("DBOS", runs, first_at, float(last_ms) / 1000, int(checkpoints))
