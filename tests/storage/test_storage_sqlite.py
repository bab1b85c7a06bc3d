"""SQLite behaviour beyond the shared contract: several OS processes on one file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest

from raftmesh.storage import StorageUnavailable
from raftmesh.storage.sqlite import SqliteStore

PEER_SCRIPT = Path(__file__).with_name("sqlite_peer.py")
WRITES_PER_PEER = 150


async def test_two_processes_write_one_file_without_lock_errors(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    barrier_dir = tmp_path / "barrier"
    barrier_dir.mkdir()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(PEER_SCRIPT),
            str(db),
            peer,
            str(barrier_dir),
            str(WRITES_PER_PEER),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for peer in ("a", "b")
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)

    reports = []
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr.decode()
        reports.append(json.loads(stdout))
    assert sorted(r["claimed_shared"] for r in reports) == [False, True]
    all_seqs = sorted(seq for r in reports for seq in r["seqs"])
    assert all_seqs == list(range(1, 2 * WRITES_PER_PEER + 1))

    store = SqliteStore(str(db))
    await store.open()
    try:
        for peer in ("a", "b"):
            steps = await store.load_steps(f"own-{peer}")
            assert [s.seq for s in steps] == list(range(1, WRITES_PER_PEER + 1))
            assert {s.value for s in steps} == {peer.encode()}
    finally:
        await store.close()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_migrations").fetchall() == [
            (1,),
            (2,),
            (3,),
            (4,),
        ]


async def test_an_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "missing-dir" / "raftmesh.db"))

    with pytest.raises(StorageUnavailable):
        await store.open()
