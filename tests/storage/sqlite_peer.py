"""One peer process for the multi-process SQLite test.

Run as a script: ``sqlite_peer.py DB_PATH PEER BARRIER_DIR WRITES``. It opens
the store (racing the other peer's migration), races it to claim the shared
run, then appends events to the shared run and checkpoints steps of its own
run, and prints what it saw as JSON on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from raftmesh.consensus.spec import RunSpec
from raftmesh.storage import RunRow, StaleEpoch
from raftmesh.storage.sqlite import SqliteStore

PEERS = 2


def barrier(folder: Path, name: str, peer: str) -> None:
    """Wait until every peer has reached ``name``, so the next phase overlaps."""
    (folder / f"{name}-{peer}").touch()
    deadline = time.monotonic() + 15
    while len(list(folder.glob(f"{name}-*"))) < PEERS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"peers never all reached {name}")
        time.sleep(0.002)


async def main(db_path: str, peer: str, folder: Path, writes: int) -> dict[str, object]:
    await asyncio.to_thread(barrier, folder, "open", peer)
    store = SqliteStore(db_path)
    await store.open()
    try:
        own = f"own-{peer}"
        await store.claim(RunRow(id=own, spec=RunSpec("echo", input=b"")), 1, peer, 0)
        try:
            await store.claim(RunRow(id="shared", spec=RunSpec("echo", input=b"")), 1, peer, 0)
            claimed_shared = True
        except StaleEpoch:
            claimed_shared = False
        await asyncio.to_thread(barrier, folder, "write", peer)
        seqs = []
        for i in range(writes):
            seqs.append(await store.append_event("shared", 1, peer, b"", i))
            await store.put_step(own, 1, i + 1, "step", peer.encode(), peer, i)
            await store.read_events("shared", after_seq=seqs[-1] - 1)
        return {"claimed_shared": claimed_shared, "seqs": seqs}
    finally:
        await store.close()


if __name__ == "__main__":
    db, peer_name, barrier_dir, count = sys.argv[1:]
    print(json.dumps(asyncio.run(main(db, peer_name, Path(barrier_dir), int(count)))))
