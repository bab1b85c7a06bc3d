"""The pysyncobj binding: real Raft nodes on loopback sockets, in one process.

Checks what the peer relies on: commits through any node, journal synced
before acknowledgement, and state recovered from the data dirs after a full
restart, also after log compaction into a (msgpack) snapshot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from pysyncobj import SyncObj
from pysyncobj.journal import createJournal
from pysyncobj.serializer import Serializer

from raftmesh.consensus import commands
from raftmesh.consensus import raft as raft_module
from raftmesh.consensus.errors import NoQuorum, UnencodableCommand
from raftmesh.consensus.raft import RaftNode, RaftTimers, _DurableJournal, _Outbox
from raftmesh.consensus.results import Result
from raftmesh.consensus.state import MeshState


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_nodes(addrs: list[str], root: Path, timers: RaftTimers) -> list[RaftNode]:
    loop = asyncio.get_running_loop()
    return [
        RaftNode(
            a, addrs, str(root / f"n{i}"), "test-secret", loop, lambda c, r: None, timers=timers
        )
        for i, a in enumerate(addrs)
    ]


async def wait_leader(nodes: list[RaftNode], timeout_s: float = 20) -> RaftNode:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leaders = [n for n in nodes if n.is_leader]
        if leaders:
            return leaders[0]
        await asyncio.sleep(0.02)
    raise AssertionError("no leader elected")


def submit(i: int) -> commands.Command:
    return commands.Submit(
        uuid.uuid4().hex, 1_000 + i, [{"id": f"run-{i}", "agent": "echo", "input": i}]
    )


async def propose_retrying(node: RaftNode, cmd: commands.Command) -> Result:
    for _ in range(20):
        try:
            return await node.propose(cmd)
        except NoQuorum:
            await asyncio.sleep(0.2)
    raise AssertionError("never committed")


async def submit_through_every_node(nodes: list[RaftNode], runs: range) -> None:
    """Once there is a leader, run i submitted through node i % 3."""
    await wait_leader(nodes)
    for i in runs:
        assert (await propose_retrying(nodes[i % 3], submit(i))).ok


async def runs_on_every_node(nodes: list[RaftNode], count: int) -> list[int]:
    """How many runs each node holds, once every node holds ``count`` (or
    after 10 s): replicas apply a commit each on its own tick."""
    for _ in range(200):
        if all(len(n.state.runs) == count for n in nodes):
            break
        await asyncio.sleep(0.05)
    return [len(n.state.runs) for n in nodes]


async def test_commit_through_every_node_and_recover_after_full_restart(tmp_path: Path) -> None:
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    timers = RaftTimers(compaction_min_entries=20)
    nodes = start_nodes(addrs, tmp_path, timers)
    try:
        await wait_leader(nodes)
        results = [await propose_retrying(nodes[i % 3], submit(i)) for i in range(60)]
        assert all(r.ok and r.runs[0].created for r in results)
        # Acknowledged means synced: on the leader and on a majority nothing
        # is left only in the page cache.
        synced = [n for n in nodes if not n.journal._dirty and n.journal.syncs > 0]
        assert len(synced) >= 2
        retry = await propose_retrying(nodes[1], dataclasses.replace(submit(0), cid="same"))
        again = await propose_retrying(nodes[2], dataclasses.replace(submit(0), cid="same"))
        assert retry == again, "a retried command id is applied once"
        await asyncio.sleep(1.0)
        assert all(len(n.state.runs) == 60 for n in nodes)
        assert any((tmp_path / f"n{i}" / "raft.dump").exists() for i in range(3)), (
            "compaction wrote a snapshot"
        )
    finally:
        for n in nodes:
            n.close()

    nodes = start_nodes(addrs, tmp_path, timers)
    try:
        await wait_leader(nodes)
        result = await propose_retrying(nodes[0], submit(999))
        assert result.ok
        assert await runs_on_every_node(nodes, 61) == [61] * 3
        assert all(n.state.runs["run-5"].spec.input == 5 for n in nodes)
    finally:
        for n in nodes:
            n.close()


async def test_a_dump_whose_journal_was_never_compacted_loses_no_later_entry(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """pysyncobj drops the journal's head only after it reaps the forked
    child that wrote the dump. A peer killed between the two (or whose child
    outlived it and renamed the dump after) restarts with a dump and a
    journal that still starts before it; pysyncobj then cleared the whole
    journal, entries after the dump too. A majority restarting so lost
    committed runs (a full restart: 57 of 61)."""
    monkeypatch.setattr(SyncObj, "_SyncObj__deleteEntriesTo", lambda self, to: None)
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    timers = RaftTimers(compaction_min_entries=20)
    dumps = [tmp_path / f"n{i}" / "raft.dump" for i in range(3)]
    nodes = start_nodes(addrs, tmp_path, timers)
    try:
        await submit_through_every_node(nodes, range(60))
        for _ in range(200):
            if all(d.exists() for d in dumps):
                break
            await asyncio.sleep(0.05)
        assert all(d.exists() for d in dumps), "every node wrote a dump"
        monkeypatch.setattr(Serializer, "serialize", lambda self, data, id: None)
        await asyncio.sleep(0.5)  # a dump child still writing finishes
        await submit_through_every_node(nodes, range(60, 70))
        await runs_on_every_node(nodes, 70)
    finally:
        for n in nodes:
            n.close()
    monkeypatch.undo()
    nodes = start_nodes(addrs, tmp_path, timers)
    try:
        await wait_leader(nodes)
        assert await runs_on_every_node(nodes, 70) == [70] * 3
        assert (await propose_retrying(nodes[0], submit(999))).ok
    finally:
        for n in nodes:
            n.close()


async def test_the_snapshot_is_packed_in_the_dump_child_not_on_the_tick_thread(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Packing the whole state on the tick thread held the GIL, so the node's
    Raft and event loop, for 80-300 ms at every compaction with 10,000 runs
    (the acknowledgement p99). pysyncobj pickles the dump in a forked child:
    the state is packed there, from the child's copy of it, at nice 19 so
    that it takes no core the peers want."""
    packed_in = tmp_path / "packed-in"
    real = MeshState.to_dict

    def to_dict(state: MeshState) -> dict[str, Any]:
        with open(packed_in, "a") as f:
            f.write(f"{os.getpid()} {os.getpriority(os.PRIO_PROCESS, 0)}\n")
        return real(state)

    monkeypatch.setattr(MeshState, "to_dict", to_dict)
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    timers = RaftTimers(compaction_min_entries=20)
    nodes = start_nodes(addrs, tmp_path, timers)
    try:
        await submit_through_every_node(nodes, range(60))
        for _ in range(100):
            if any((tmp_path / f"n{i}" / "raft.dump").exists() for i in range(3)):
                break
            await asyncio.sleep(0.05)
    finally:
        for n in nodes:
            n.close()
    packs = (
        [line.split() for line in packed_in.read_text().splitlines()] if packed_in.exists() else []
    )
    assert packs, "no snapshot was packed"
    assert all(pid != str(os.getpid()) for pid, _ in packs), "packed in the node's own process"
    assert all(int(nice) == 19 for _, nice in packs), "the dump child yields the cores: nice 19"
    monkeypatch.undo()
    nodes = start_nodes(addrs, tmp_path, timers)
    try:
        await wait_leader(nodes)
        assert (await propose_retrying(nodes[0], submit(999))).ok
        assert await runs_on_every_node(nodes, 61) == [61] * 3
    finally:
        for n in nodes:
            n.close()


async def test_concurrent_proposals_share_log_entries(tmp_path: Path) -> None:
    """Group commit: 400 submissions proposed at once through a follower and
    the leader commit in a handful of log entries (at most MAX_IN_FLIGHT are
    outstanding per node), not one entry and one fsync round per command."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    nodes = start_nodes(addrs, tmp_path, RaftTimers())
    try:
        leader = await wait_leader(nodes)
        follower = next(n for n in nodes if n is not leader)
        await propose_retrying(leader, submit(-1))
        before = leader.status()["log_len"]
        results = await asyncio.gather(
            *(propose_retrying(follower if i % 2 else leader, submit(i)) for i in range(400))
        )
        assert all(r.ok and r.runs[0].created for r in results)
        entries = leader.status()["log_len"] - before
        print(f"400 commands took {entries} log entries")
        assert 2 <= entries <= 60, f"400 commands took {entries} log entries"
    finally:
        for n in nodes:
            n.close()


async def test_entries_near_the_size_limit_pass_the_guarded_raft_port(tmp_path: Path) -> None:
    """The Raft port's frame caps (consensus/raft_port.py) let peers' real
    traffic through: a 1 MiB command (16 times the unauthenticated cap),
    proposed through a follower (forwarded to the leader, then replicated),
    commits on every node. (Entries near MAX_ENTRY_BYTES are not shown here:
    pysyncobj's zlib compression of them, on the tick thread, takes long enough
    on a loaded 2-core machine to cost the leadership.)"""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    nodes = start_nodes(addrs, tmp_path, RaftTimers())
    try:
        leader = await wait_leader(nodes)
        follower = next(n for n in nodes if n is not leader)
        big = os.urandom(512 * 1024).hex()
        cmd = commands.Submit(
            uuid.uuid4().hex, 1_000, [{"id": "big", "agent": "echo", "input": big}]
        )
        result = await propose_retrying(follower, cmd)
        assert result.ok and result.runs[0].created
        deadline = time.monotonic() + 20
        while not all("big" in n.state.runs for n in nodes):
            assert time.monotonic() < deadline, "the big entry did not reach every node"
            await asyncio.sleep(0.05)
        assert all(n.state.runs["big"].spec.input == big for n in nodes)
    finally:
        for n in nodes:
            n.close()


async def test_an_unencodable_command_fails_alone_and_the_next_ones_commit(tmp_path: Path) -> None:
    """A priority of 2**64 cannot be msgpack-encoded. Proposed together with
    good commands, through the leader and through a follower, it fails its own
    caller at once; the commands queued with it and after it still commit."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    nodes = start_nodes(addrs, tmp_path, RaftTimers())
    try:
        leader = await wait_leader(nodes)
        follower = next(n for n in nodes if n is not leader)
        await propose_retrying(leader, submit(-1))
        for node in (leader, follower):
            bad = commands.Submit(uuid.uuid4().hex, 1, [{"id": "huge", "priority": 2**64}])
            proposals = [
                asyncio.ensure_future(node.propose(cmd))
                for cmd in (
                    submit(1),
                    bad,
                    submit(2),
                    dataclasses.replace(
                        submit(3), runs=[{"id": "x", "agent": "e", "input": object()}]
                    ),
                )
            ]
            done, _ = await asyncio.wait(proposals, timeout=10)
            assert len(done) == 4, "every caller got an answer within the commit timeout"
            first, huge, second, opaque = (p.exception() or p.result() for p in proposals)
            assert isinstance(huge, UnencodableCommand) and "out of range" in str(huge)
            assert isinstance(opaque, UnencodableCommand)
            assert first.ok and second.ok, (first, second)
            later = await asyncio.wait_for(node.propose(submit(4)), 10)
            assert later.ok
        assert "huge" not in leader.state.runs
    finally:
        for n in nodes:
            n.close()


async def test_no_acknowledgment_leaves_and_no_commit_counts_over_unsynced_entries(
    tmp_path: Path,
) -> None:
    """An acknowledgment of entries (or a vote) goes out only once the journal
    is synced, and a leader moves its commit index only over a synced journal,
    through the leader and through followers. A leader's append-entries do
    leave before its own sync: the followers sync while it does."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    nodes = start_nodes(addrs, tmp_path, RaftTimers())
    unsynced: list[str] = []
    early: list[str] = []
    unsynced_commits: list[int] = []
    for node in nodes:
        raw = node._outbox._send

        def checked(peer: object, message: Any, node: RaftNode = node, raw: Any = raw) -> bool:
            if node.journal.dirty:
                kind = message.get("type")
                (unsynced if kind in ("next_node_idx", "response_vote") else early).append(kind)
            return bool(raw(peer, message))

        node._outbox._send = checked
        moved = node.journal._inner.setRaftCommitIndex

        def commit(index: int, node: RaftNode = node, moved: Any = moved) -> None:
            if node._syncobj._isLeader() and node.journal.dirty:
                unsynced_commits.append(index)
            moved(index)

        node.journal.setRaftCommitIndex = commit  # type: ignore[method-assign]
    try:
        leader = await wait_leader(nodes)
        follower = next(n for n in nodes if n is not leader)
        await propose_retrying(leader, submit(-1))
        entries_before = leader.status()["log_len"]
        syncs_before = follower.journal.syncs
        for wave in range(10):
            results = await asyncio.gather(
                *(propose_retrying(nodes[i % 3], submit(wave * 30 + i)) for i in range(30))
            )
            assert all(r.ok for r in results)
        entries = leader.status()["log_len"] - entries_before
        syncs = follower.journal.syncs - syncs_before
        print(f"follower: {syncs} syncs for {entries} entries; {len(early)} sent before a sync")
        assert not unsynced, f"answered with unsynced entries: {unsynced[:3]}"
        assert not unsynced_commits, f"a leader committed over unsynced entries: {unsynced_commits}"
        assert "append_entries" in early, "the leader's entries left before its own sync"
        assert syncs > 0, "the follower stored entries"
    finally:
        for n in nodes:
            n.close()


def test_the_outbox_holds_answers_until_one_sync_and_keeps_each_nodes_order(
    tmp_path: Path,
) -> None:
    """The tick-thread side on its own. An acknowledgment sent while an entry is
    unsynced waits for the end of the tick, and so does every later message to
    the same node; one sync lets them all go in order. Messages to another
    node, and append-entries, go at once."""
    path = str(tmp_path / "raft.journal")
    inner = createJournal(path)
    journal = _DurableJournal(inner, path, str(tmp_path / "raft.dump"))
    sent: list[tuple[str, int, bool]] = []

    def send(node: Any, message: Any) -> bool:
        sent.append((node, message["n"], journal.dirty))
        return True

    def ack(n: int) -> dict[str, Any]:
        return {"type": "next_node_idx", "n": n}

    def entries(n: int) -> dict[str, Any]:
        return {"type": "append_entries", "n": n}

    outbox = _Outbox(journal, send)
    try:
        outbox.send("a", ack(0))
        assert sent == [("a", 0, False)], "a clean journal holds nothing back"
        journal.add(b"entry", 1, 1)
        outbox.send("a", ack(1))
        outbox.send("a", entries(2))
        outbox.send("b", entries(3))
        outbox.send("b", ack(4))
        outbox.send("b", entries(5))
        assert [m for _, m, _ in sent] == [0, 3], "only b's append-entries left before the sync"
        outbox.flush()
        assert journal.syncs == 1, "one sync for the tick"
        assert [m for _, m, _ in sent] == [0, 3, 1, 2, 4, 5]
        assert not any(dirty for _, m, dirty in sent if m in (1, 4)), "answers after the sync"
        outbox.flush()
        assert journal.syncs == 1, "a tick with nothing new syncs nothing"
    finally:
        inner._destroy()


def test_a_journal_destroyed_with_an_unsynced_entry_keeps_it_and_closes_cleanly(
    tmp_path: Path,
) -> None:
    """pysyncobj destroys its journal on the tick thread, then RaftNode.close
    syncs: an entry appended after the last sync made that sync flush a closed
    mmap (ValueError: a peer exited 1 on SIGTERM under load)."""
    path = str(tmp_path / "raft.journal")
    journal = _DurableJournal(createJournal(path), path, str(tmp_path / "raft.dump"))
    journal.add(b"entry", 1, 1)
    assert journal.dirty
    journal._destroy()  # as SyncObj._doDestroy calls it
    journal.sync()  # as RaftNode.close does after destroy_synchronous
    reopened = createJournal(path)
    try:
        assert [tuple(reopened[i]) for i in range(len(reopened))] == [(b"entry", 1, 1)]
    finally:
        reopened._destroy()


def test_a_journal_sync_writes_the_file_without_holding_the_gil(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """pysyncobj's flush is mmap.flush, an msync that CPython makes while
    holding the GIL: each sync froze the peer's event loop for the disk write
    (a tenth to a fifth of a loaded peer's time in the profile). The journal
    syncs with an fdatasync of the journal file instead, which releases it."""
    path = str(tmp_path / "raft.journal")
    inner = createJournal(path)
    heard: list[float] = []
    journal = _DurableJournal(inner, path, str(tmp_path / "raft.dump"), heard.append)
    synced_inodes: list[int] = []
    real = raft_module._datasync

    def datasync(fd: int) -> None:
        synced_inodes.append(os.fstat(fd).st_ino)
        real(fd)

    def msync() -> None:
        raise AssertionError("the journal synced through mmap.flush (holds the GIL)")

    monkeypatch.setattr(raft_module, "_datasync", datasync)
    monkeypatch.setattr(inner, "flush", msync)
    try:
        journal.add(b"entry", 1, 1)
        journal.sync()
        assert synced_inodes == [os.stat(path).st_ino]
        assert not journal.dirty and journal.syncs == 1
        journal.sync()  # nothing new: no sync, nothing to hear
        assert len(heard) == 1 and heard[0] > 0, "the sync's duration reaches the metric"
    finally:
        monkeypatch.undo()
        journal._destroy()
    reopened = createJournal(path)
    try:
        assert [tuple(reopened[i]) for i in range(len(reopened))] == [(b"entry", 1, 1)]
    finally:
        reopened._destroy()


def test_nodes_compact_at_thresholds_of_their_own() -> None:
    """Every node applies the same entries: with one threshold they all
    snapshot at the same entry, and the whole mesh stalled together."""
    addrs = [f"10.0.0.{i}:4321" for i in range(1, 6)]
    thresholds = [raft_module._staggered(5000, addr) for addr in addrs]
    assert len(set(thresholds)) == len(addrs), thresholds
    assert all(5000 <= t <= 7500 for t in thresholds), thresholds
    assert raft_module._staggered(5000, addrs[0]) == thresholds[0], "fixed per address"
