"""The machine the benchmark runs on: PostgreSQL schemas, Redis, raw commit rate, RSS.

Every system under test gets a schema of its own in the same PostgreSQL
database, made for the run and dropped after it, so that several runs (and
other people's tests) can share one server.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "127.0.0.1:6379"


class BenchSetupError(RuntimeError):
    """Something the benchmark needs could not be provided (database, Redis, a worker)."""


def new_schema(prefix: str) -> str:
    return f"bench_{prefix}_{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def schema(pg_url: str, prefix: str) -> AsyncIterator[str]:
    """A fresh, empty schema for one system; dropped with everything in it afterwards."""
    name = new_schema(prefix)
    try:
        conn = await asyncpg.connect(pg_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise BenchSetupError(f"PostgreSQL at {pg_url} does not answer: {exc}") from exc
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await conn.close()
    try:
        yield name
    finally:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()


@dataclass(frozen=True)
class CommitRate:
    clients: int
    commits: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.commits / self.seconds


async def raw_commit_rate(pg_url: str, clients: int, duration_s: float) -> CommitRate:
    """Single-row autocommitted INSERTs from ``clients`` connections: what the
    server's WAL flushes allow, the physical limit for anything that stores a
    run's outcome or checkpoint durably."""
    async with schema(pg_url, "commits") as name:
        setup = await asyncpg.connect(pg_url)
        try:
            await setup.execute(f'CREATE TABLE "{name}".t (id bigserial PRIMARY KEY, v int)')
        finally:
            await setup.close()
        conns = [await asyncpg.connect(pg_url) for _ in range(clients)]
        counts = [0] * clients
        query = f'INSERT INTO "{name}".t (v) VALUES ($1)'
        started = time.monotonic()
        deadline = started + duration_s

        async def one(i: int) -> None:
            while time.monotonic() < deadline:
                await conns[i].execute(query, i)
                counts[i] += 1

        try:
            await asyncio.gather(*(one(i) for i in range(clients)))
            elapsed = time.monotonic() - started
        finally:
            for conn in conns:
                await conn.close()
    return CommitRate(clients, sum(counts), elapsed)


def rss_mb(pid: int) -> float | None:
    """Resident set size of one process (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _answers(hostport: str) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """The Redis Celery uses: the one that answers at ``address``, else one started here.

    A server started here (Debian's redis-server, installed with apt-get when
    missing) keeps nothing on disk and is stopped by ``stop``.
    """

    def __init__(self, address: str = DEFAULT_REDIS) -> None:
        self.address = address
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, workdir: Path) -> str:
        if _answers(self.address):
            return self.address
        binary = shutil.which("redis-server") or _install_redis()
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        log = open(workdir / "redis.log", "ab")  # noqa: SIM115 - closed with the process
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 15
        while not _answers(self.address):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise BenchSetupError(f"redis-server did not start; see {workdir / 'redis.log'}")
            time.sleep(0.1)
        return self.address

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._process = None


def _install_redis() -> str:
    commands = [
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "redis-server"],
    ]
    for argv in commands:
        done = subprocess.run(
            argv,
            capture_output=True,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        if done.returncode != 0:
            raise BenchSetupError(
                "no Redis answers and redis-server could not be installed "
                f"({' '.join(argv)} failed): apt-get install redis-server"
            )
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchSetupError("redis-server was installed but is not on PATH")
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pg_host_port(pg_url: str) -> tuple[str, int]:
    parts = urlsplit(pg_url)
    return parts.hostname or "127.0.0.1", parts.port or 5432
