"""The pysyncobj binding: the only module that imports pysyncobj.

It owns the concerns pysyncobj leaves to its user (see
shared/notes/pysyncobj.md):

* Durability. pysyncobj writes its journal through mmap and never syncs it.
  ``_Outbox`` holds back acknowledgments sent while the journal has unsynced
  entries and sends them, in order, after one sync at the end of the tick, and
  a tick syncs before it counts the leader towards a commit, so an entry a
  follower acknowledges, or a leader counts towards a commit, is on disk: a
  power loss of every peer loses nothing acknowledged. A leader's
  append-entries leave before its own sync, so its sync and the followers'
  overlap. Syncs are batched: one per tick that added entries, not one per
  message or entry.
* Latency. Batching of append-entries is off (entries go out as soon as they
  are queued) and a group-commit batcher on the asyncio side packs every
  command that arrives while earlier entries are in flight into one entry.
* The thread seam. Applies and callbacks run on pysyncobj's tick thread; they
  reach the event loop only through ``loop.call_soon_threadsafe``. Readers on
  the loop take ``RaftNode.lock`` to see a consistent state.
* Membership. Voters change one at a time through pysyncobj's dynamic
  membership (a change takes effect when appended and is replayed from the
  journal or snapshot on restart). The latest voter set this node has seen is
  also kept in ``voters.json`` in the data dir, because a restarted node needs
  partners before it can read anything: a joined node's command line names
  only the seed it joined through. A node with no address of its own is an
  executor: pysyncobj's read-only node, which receives the log and can
  propose, but never votes. A joining voter is such a node first (a learner)
  and is rebuilt as a voter in-process once promoted (``become_voter``).
  After ``mesh recover`` the voter set is pinned (``_PinnedSyncObj``) until a
  snapshot has dropped the old membership changes from the journal.
* The port. pysyncobj unpickles every frame that passes its Fernet check, and
  before that check buffers frames of any length from anyone: the transport
  comes from ``raft_port``, which bounds both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.journal import createJournal
from pysyncobj.node import Node, TCPNode

from raftmesh.consensus.commands import (
    Command,
    CommandDecodeError,
    decode_entry,
    encode_command,
    join_entry,
)
from raftmesh.consensus.errors import NoQuorum, ProposalFailed
from raftmesh.consensus.raft_port import GuardedTransport
from raftmesh.consensus.results import Result
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.voters import VOTERS_FILE, persisted_voters

log = logging.getLogger("raftmesh.raft")

AMBIGUOUS = frozenset({FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME})
# Nothing committed, and trying again may well commit: a new leader overwrote
# the entry (DISCARDED), or there is no leader yet.
NOT_COMMITTED = frozenset({FAIL_REASON.DISCARDED, FAIL_REASON.MISSING_LEADER})
_FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if k.isupper()}

MAX_IN_FLIGHT = 4
MAX_COMMANDS_PER_ENTRY = 2000
MAX_ENTRY_BYTES = 8 * 1024 * 1024
# pysyncobj splits an entry larger than its batch size into a "transmission"
# that it reassembles wrongly; entries are kept below this bound instead.
APPEND_BATCH_BYTES = 4 * MAX_ENTRY_BYTES


@dataclass(frozen=True)
class RaftTimers:
    """Tuned for a LAN: commits in milliseconds, a dead leader replaced in
    about a second, a cut-off leader stepping down within a few seconds."""

    min_election_timeout_s: float = 0.5
    max_election_timeout_s: float = 1.2
    heartbeat_s: float = 0.05
    leader_fallback_s: float = 2.5
    connection_timeout_s: float = 2.0
    reconnect_s: float = 0.3
    compaction_min_entries: int = 5000
    compaction_min_time_s: float = 300.0


def _staggered(entries: int, self_addr: str | None) -> int:
    """This node's compaction threshold: up to half as many entries again,
    fixed per address. Every node applies the same entries, so with one
    threshold they all snapshot at once, and a snapshot (then serialised on
    the tick thread) stalled the whole mesh together: the p99 of
    acknowledgements at 500/s was those stalls."""
    return entries + zlib.crc32((self_addr or "").encode()) % (entries // 2 + 1)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# macOS has no fdatasync; its fsync writes the file's pages too.
_datasync = getattr(os, "fdatasync", os.fsync)


class _DurableJournal:
    """Wraps pysyncobj's FileJournal so nothing it reports is only in page cache."""

    def __init__(
        self,
        inner: Any,
        journal_path: str,
        dump_path: str,
        on_sync: Callable[[float], None] | None = None,
    ) -> None:
        """``on_sync(seconds)`` hears how long each sync took (tick thread)."""
        self._inner = inner
        self._on_sync = on_sync
        self._journal_path = journal_path
        self._dump_path = dump_path
        self._dir = os.path.dirname(journal_path)
        self._dirty = False
        self.syncs = 0
        # pysyncobj's own flush is an msync, and CPython's mmap.flush holds the
        # GIL for the whole disk write: every sync stalled the event loop (a
        # tenth to a fifth of a loaded peer's time). An fdatasync of the same
        # file writes the same pages (Linux implements msync(MS_SYNC) as a
        # datasync of the file's range) and lets the loop run meanwhile. The
        # journal is one file for the node's life (pysyncobj never replaces it).
        self._fd = os.open(journal_path, os.O_RDONLY)

    @property
    def dirty(self) -> bool:
        """Entries were added or removed since the last sync."""
        return self._dirty

    def sync(self) -> None:
        if not self._dirty:
            return
        started = time.perf_counter()
        _datasync(self._fd)
        self._dirty = False
        self.syncs += 1
        if self._on_sync is not None:
            self._on_sync(time.perf_counter() - started)

    def add(self, command: bytes, idx: int, term: int) -> None:
        self._inner.add(command, idx, term)
        self._dirty = True

    def clear(self) -> None:
        self._inner.clear()
        self._dirty = True

    def deleteEntriesFrom(self, entry_from: int) -> None:  # noqa: N802 - pysyncobj's name
        self._inner.deleteEntriesFrom(entry_from)
        self._dirty = True

    def deleteEntriesTo(self, entry_to: int) -> None:  # noqa: N802
        # The snapshot must be durable before the entries it replaces go.
        if os.path.exists(self._dump_path):
            _fsync_path(self._dump_path)
            _fsync_path(self._dir)
        self._inner.deleteEntriesTo(entry_to)
        self._dirty = True
        self.sync()

    def _destroy(self) -> None:
        # pysyncobj's destroy flushes and closes the file (its msync is the
        # last sync); a sync after it would flush a closed mmap. Without this,
        # a peer stopped with an unsynced entry exited 1 on SIGTERM.
        self._inner._destroy()
        self._dirty = False
        os.close(self._fd)

    def setCurrentTerm(self, term: int, voted_for: Any) -> None:  # noqa: N802
        # Term and vote must survive power loss before any vote is sent.
        self._inner.setCurrentTerm(term, voted_for)
        _fsync_path(self._journal_path + ".meta")
        _fsync_path(self._dir)

    def __getitem__(self, item: Any) -> Any:
        return self._inner[item]

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# The messages that speak for this node's log: a follower's acknowledgment of
# entries (pysyncobj's next_node_idx, sent after append-entries) and a vote.
_ANSWERS_FOR_THE_LOG = frozenset({"next_node_idx", "response_vote"})


class _Outbox:
    """Raft messages to other nodes; those that speak for this node's log wait
    until the journal is synced.

    An acknowledgment sent while the journal has unsynced changes is held and
    goes after one sync at the end of the tick, so an entry a follower
    acknowledges is on its disk. Every other message goes at once: a leader's
    append-entries leave before its own sync, so the followers' syncs run while
    the leader's does, as the Raft thesis allows (section 10.2.1). The leader
    still counts itself towards a commit only over a synced journal
    (``_MeshSyncObj._onTick`` syncs before the tick counts). A message to a
    node with held messages queues behind them, so each connection sees
    pysyncobj's order. The tick thread is the only caller.
    """

    def __init__(self, journal: _DurableJournal, send: Callable[[Any, Any], bool]) -> None:
        self._journal = journal
        self._send = send
        self._held: list[tuple[Any, Any]] = []

    def send(self, node: Any, message: Any) -> bool:
        if (self._journal.dirty and message.get("type") in _ANSWERS_FOR_THE_LOG) or any(
            held == node for held, _ in self._held
        ):
            self._held.append((node, message))
            return True
        return self._send(node, message)

    def flush(self) -> None:
        self._journal.sync()
        held, self._held = self._held, []
        for node, message in held:
            self._send(node, message)


class _PackedWhenPickled:
    """The state's snapshot, packed only when pysyncobj pickles the dump, which
    it does in a child forked from the tick thread: the child's copy of the
    state is the state at the fork. Packed on the tick thread, a snapshot of
    10,000 runs held the GIL, and so this peer's Raft and event loop, for
    80-300 ms at every compaction: the acknowledgement p99 under load. Unpickled,
    it is the plain ``{"state": bytes}`` that ``_deserialize`` reads."""

    __slots__ = ("_state", "_pid")

    def __init__(self, state: MeshState) -> None:
        self._state = state
        self._pid = os.getpid()

    def __reduce__(self) -> tuple[type[dict[str, bytes]], tuple[dict[str, bytes]]]:
        if os.getpid() != self._pid:
            # The child's pack, pickle and gzip take a core for a few hundred
            # milliseconds with 10,000 runs, a core the peers' ticks and loops
            # then waited for. The dump can wait for them instead.
            os.nice(19)
        return dict, ({"state": msgpack.packb(self._state.to_dict(), use_bin_type=True)},)


class _Replica(SyncObjConsumer):
    """Applies log entries to the MeshState on the tick thread."""

    def __init__(self, node: RaftNode) -> None:
        super().__init__()
        self._node = node

    @replicated
    def apply_entry(self, payload: bytes) -> list[Result]:
        node = self._node
        try:
            cmds = decode_entry(payload)
        except CommandDecodeError as exc:
            log.error("skipping log entry: %s", exc)
            return []
        with node.lock:
            results = [node.state.apply(cmd) for cmd in cmds]
        node._notify(cmds, results)
        return results

    def _serialize(self) -> _PackedWhenPickled:
        # No lock: pysyncobj calls this on the tick thread, the state's only
        # writer, so nothing changes the state meanwhile. The lock would hold
        # every reader on the event loop for the whole snapshot.
        return _PackedWhenPickled(self._node.state)

    def _deserialize(self, data: dict[str, bytes]) -> None:
        restored = MeshState.from_dict(
            msgpack.unpackb(data["state"], raw=False, strict_map_key=False)
        )
        with self._node.lock:
            self._node.state.__dict__.update(restored.__dict__)
        self._node._notify([], [])


class _DialNode(TCPNode):
    """A partner known by its advertised address but reached at another one.

    pysyncobj identifies a node by the address it announces and decides which
    side of a pair dials by comparing addresses, so both must stay the
    advertised ones; only the socket connect goes to ``dial`` (a NAT or proxy).
    """

    def __init__(self, address: str, dial: str) -> None:
        super().__init__(address)
        host, _, port = dial.rpartition(":")
        self._dial_host = host
        self._dial_port = int(port)

    @property
    def ip(self) -> str:
        return self._dial_host

    @property
    def port(self) -> int:
        return self._dial_port


class _Entry:
    """One log entry in flight and the futures waiting on its commands."""

    def __init__(self, futures: list[asyncio.Future[Result]]) -> None:
        self.futures = futures
        self.settled = False
        self.timer: asyncio.TimerHandle | None = None


def _expire(fut: asyncio.Future[Result]) -> None:
    if not fut.done():
        fut.set_exception(NoQuorum("no commit: timeout"))


RECOVERY_FILE = "recovery.json"
RAFT_FILES = ("raft.journal", "raft.journal.meta", "raft.dump", "raft.dump.tmp")


class _MeshSyncObj(SyncObj):
    """pysyncobj's SyncObj, keeping the voters it reaches the log through when
    it loads a snapshot.

    Loading a snapshot sets the voter set to the snapshot's, dropping the
    connections to voters not in it; the membership entries after the
    snapshot are to bring them back. But those entries come from the journal
    or from the leader, and the snapshot can be older than either:
    - installed from a leader that joined after the snapshot was taken (it
      still hands that snapshot on), the node would drop the very leader
      that is to send it the entries after it;
    - loaded at a restart whose journal does not reach past the snapshot,
      the node would refuse the connections of voters that joined since,
      the leader among them, and its elections would depose that leader.
    Both stalled the node for good (issue 11's 600 s soak). So the leader
    that sends the snapshot stays, and at a start (no leader yet) the voters
    this node was started with, the ones it last knew, stay too, until the
    entries after the snapshot say otherwise. A voter kept by mistake only
    makes this node's majorities larger, never smaller.
    """

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802, N803 - pysyncobj's names
        # The tick counts the leader itself towards a commit first thing; the
        # poll before it may have appended entries (a new leader's no-op):
        # they are synced first, since the leader's append-entries leave
        # before its sync (_Outbox).
        sync = getattr(self._SyncObj__raftLog, "sync", None)
        if sync is not None:  # None until RaftNode wraps the journal
            sync()
        super()._onTick(timeToWait)

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:  # noqa: N802, N803
        # pysyncobj drops the journal's head only once it has reaped the child
        # that wrote the dump. A peer that died between the two (or whose child
        # outlived it) starts with a dump and a journal that begins before it,
        # and pysyncobj then clears the whole journal, the committed entries
        # after the dump with it: a majority restarting so lost acknowledged
        # runs. Dropping the head here is the compaction that peer missed.
        if not clearJournal:
            journal = self._SyncObj__raftLog
            try:
                _, last, before, _ = self._SyncObj__serializer.deserialize()
            except Exception:
                before = None  # pysyncobj's own load says why
            if before is not None and len(journal) >= 2:
                at = before[1] - journal[0][1]
                if 0 < at < len(journal) - 1 and journal[at] == before and journal[at + 1] == last:
                    journal.deleteEntriesTo(at)
        SyncObj._SyncObj__loadDumpFile(self, clearJournal)

    def _SyncObj__updateClusterConfiguration(self, new_nodes: Any) -> None:  # noqa: N802
        leader = self._SyncObj__raftLeader
        kept = [leader] if leader is not None else list(self._SyncObj__otherNodes)
        ids = {str(n.id) if isinstance(n, Node) else str(n) for n in new_nodes}
        me = self.selfNode
        extra = [n for n in kept if n != me and str(n.id) not in ids]
        SyncObj._SyncObj__updateClusterConfiguration(self, [*new_nodes, *extra])


class _PinnedSyncObj(_MeshSyncObj):
    """A SyncObj whose voter set is pinned after ``mesh recover``.

    pysyncobj rebuilds a node's voters from its snapshot and by replaying every
    membership change in its journal, so a node started with a new partner list
    would bring the lost voters back. While pinned, this node ignores both (and
    refuses new changes); the pin is lifted once a snapshot taken after the
    recovery has dropped the old entries from the journal.
    """

    def __init__(self, pinned: frozenset[str], *args: Any, **kwargs: Any) -> None:
        # Set before SyncObj.__init__ so pysyncobj keeps it out of its dumps.
        self._pinned: frozenset[str] | None = pinned
        super().__init__(*args, **kwargs)

    def _SyncObj__doChangeCluster(self, request: Any, reverse: bool = False) -> bool:  # noqa: N802
        if self._pinned is not None:
            return False
        return bool(SyncObj._SyncObj__doChangeCluster(self, request, reverse))

    def _SyncObj__updateClusterConfiguration(self, new_nodes: Any) -> None:  # noqa: N802
        if self._pinned is not None:
            me = self.selfNode.id if self.selfNode is not None else None
            new_nodes = [n for n in self._pinned if n != me]
        SyncObj._SyncObj__updateClusterConfiguration(self, new_nodes)


def journal_end(data_dir: str) -> tuple[int, int]:
    """(term, index) of the last entry in this data dir's Raft journal, read
    offline: of two logs, the one with the higher pair holds every committed
    entry either holds (Raft's election rule compares the same pair)."""
    path = os.path.join(data_dir, "raft.journal")
    if not os.path.exists(path):
        raise ValueError(f"{data_dir} has no Raft journal: not a voter's data dir")
    journal = createJournal(path)
    try:
        if len(journal) == 0:
            return 0, 0
        _, index, term = journal[len(journal) - 1]
        return int(term), int(index)
    finally:
        journal._destroy()


def recover_data_dir(data_dir: str, voters: list[str]) -> dict[str, Any]:
    """``mesh recover``: pin this data dir's voter set to ``voters`` for its
    next start (the peer must be stopped). See README, "Recovering a mesh that
    lost its majority"."""
    if not voters or not all(":" in v for v in voters):
        raise ValueError("--voters must list the surviving voters' Raft addresses HOST:PORT")
    known = persisted_voters(data_dir)
    if known is None:
        raise ValueError(f"{data_dir} has no {VOTERS_FILE}: not a voter's data dir")
    if not set(voters) <= set(known):
        raise ValueError(
            f"{', '.join(sorted(set(voters) - set(known)))} never was a voter of this mesh "
            f"(this data dir knew {', '.join(known)})"
        )
    term, index = journal_end(data_dir)
    record = {
        "voters": sorted(voters),
        "through_index": index,
        "lost": sorted(set(known) - set(voters)),
    }
    _write_atomically(os.path.join(data_dir, RECOVERY_FILE), json.dumps(record).encode())
    _write_atomically(
        os.path.join(data_dir, VOTERS_FILE), json.dumps({"voters": sorted(voters)}).encode()
    )
    return {**record, "last_term": term, "last_index": index}


def _pending_recovery(data_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(data_dir, RECOVERY_FILE)) as fh:
            record = json.load(fh)
    except FileNotFoundError:
        return None
    return {"voters": frozenset(record["voters"]), "through_index": int(record["through_index"])}


def _write_atomically(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path))


class RaftNode:
    """A Raft member holding the replicated MeshState; with ``self_addr`` None,
    a non-voting executor that follows the voters in ``partners``."""

    def __init__(
        self,
        self_addr: str | None,
        partners: list[str],
        data_dir: str,
        secret: str,
        loop: asyncio.AbstractEventLoop,
        on_change: Callable[[list[Any], list[Result]], None],
        timers: RaftTimers | None = None,
        commit_timeout_s: float = 5.0,
        dial: dict[str, str] | None = None,
        on_journal_sync: Callable[[float], None] | None = None,
    ) -> None:
        """``on_journal_sync(seconds)`` hears each journal sync, on the tick thread."""
        self.state = MeshState()
        self._on_journal_sync = on_journal_sync
        self.lock = threading.Lock()
        self.self_addr = self_addr
        self._loop = loop
        self._on_change = on_change
        self._commit_timeout_s = commit_timeout_s
        self._pending: list[tuple[bytes, asyncio.Future[Result]]] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self._timers = timers or RaftTimers()
        self._secret = secret
        self._dial = dial or {}
        os.makedirs(data_dir, exist_ok=True)
        self._data_dir = data_dir
        # What voters.json already says: rewritten (with an fsync, on the tick
        # thread) only when the voter set really changes.
        self._voters_seen: frozenset[str] = frozenset(persisted_voters(data_dir) or ())
        self._tick_calls: list[Callable[[], None]] = []
        self._tick_calls_lock = threading.Lock()
        recovery = _pending_recovery(data_dir)
        # The voter set ``mesh recover`` pinned, for the lifetime of this process.
        self.recovered_voters: frozenset[str] | None = recovery["voters"] if recovery else None
        self._recovery_through = recovery["through_index"] if recovery else 0
        self._compaction_asked = False
        self._start(self_addr, partners)

    def _start(self, self_addr: str | None, partners: list[str]) -> None:
        timers = self._timers
        journal_path = os.path.join(self._data_dir, "raft.journal")
        dump_path = os.path.join(self._data_dir, "raft.dump")
        conf = SyncObjConf(
            password=self._secret,
            bindAddress=self_addr,
            dynamicMembershipChange=True,
            journalFile=journal_path,
            fullDumpFile=dump_path,
            appendEntriesUseBatch=False,
            appendEntriesBatchSizeBytes=APPEND_BATCH_BYTES,
            appendEntriesPeriod=timers.heartbeat_s,
            raftMinTimeout=timers.min_election_timeout_s,
            raftMaxTimeout=timers.max_election_timeout_s,
            leaderFallbackTimeout=timers.leader_fallback_s,
            connectionTimeout=timers.connection_timeout_s,
            connectionRetryTime=timers.reconnect_s,
            logCompactionMinEntries=_staggered(timers.compaction_min_entries, self_addr),
            logCompactionMinTime=timers.compaction_min_time_s,
            commandsWaitLeader=True,
            onStateChanged=self._on_raft_state,
        )
        self._replica = _Replica(self)
        dial = self._dial
        others = [_DialNode(p, dial[p]) if p in dial else p for p in partners if p != self_addr]
        if self.recovered_voters is not None and os.path.exists(
            os.path.join(self._data_dir, RECOVERY_FILE)
        ):
            self._syncobj: SyncObj = _PinnedSyncObj(
                self.recovered_voters,
                self_addr,
                others,
                conf=conf,
                consumers=[self._replica],
                transportClass=GuardedTransport,
            )
            log.warning("recovery: voters pinned to %s", ", ".join(sorted(self.recovered_voters)))
        else:
            self._syncobj = _MeshSyncObj(
                self_addr,
                others,
                conf=conf,
                consumers=[self._replica],
                transportClass=GuardedTransport,
            )
        self.journal = _DurableJournal(
            self._syncobj._SyncObj__raftLog, journal_path, dump_path, self._on_journal_sync
        )
        self._syncobj._SyncObj__raftLog = self.journal
        transport = self._syncobj._SyncObj__transport
        self._outbox = _Outbox(self.journal, transport.send)
        transport.send = self._outbox.send
        self._syncobj.addOnTickCallback(self._on_tick)
        # Last: whatever the tick (and _on_tick) sent goes after one sync.
        self._syncobj.addOnTickCallback(self._outbox.flush)

    @property
    def is_voter(self) -> bool:
        return self.self_addr is not None

    async def become_voter(self, self_addr: str, partners: list[str]) -> None:
        """Restart this learner (a read-only node) as the voter ``self_addr``.

        pysyncobj fixes a node's identity when the SyncObj is built (a read-only
        node has no listener and dials as "readonly"), so the SyncObj is
        replaced in-process. The new voter starts from an empty log, as a fresh
        voter always has, and receives the state from the leader; the learner
        phase has shown that this peer connects and keeps up.
        """
        old = self._syncobj
        await asyncio.to_thread(old.destroy_synchronous)
        for name in RAFT_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self._data_dir, name))
        with self.lock:
            self.state = MeshState()
        self.self_addr = self_addr
        self._start(self_addr, partners)
        self._notify([], [])

    def voters(self) -> list[str]:
        """Raft addresses of the voters, as this node currently knows them."""
        for _ in range(5):
            try:
                others = {str(n.id) for n in self._syncobj.otherNodes}
                break
            except RuntimeError:  # the tick thread changed the set while we copied it
                continue
        else:
            others = {str(n.id) for n in self._syncobj.otherNodes}
        if self.self_addr is not None:
            others.add(self.self_addr)
        return sorted(others)

    def _seal_recovery(self) -> None:
        """Tick thread: once entries past the recovery point are applied, take a
        snapshot; once it has dropped the old journal, lift the pin for good."""
        obj = self._syncobj
        if not isinstance(obj, _PinnedSyncObj) or obj._pinned is None:
            return
        first_index = self.journal[0][1] if len(self.journal) else 0
        if first_index > self._recovery_through:
            obj._pinned = None
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self._data_dir, RECOVERY_FILE))
            log.warning("recovery sealed: the voter set is %s", ", ".join(self.voters()))
            return
        status = obj.getStatus()
        if not self._compaction_asked and status["last_applied"] >= self._recovery_through + 2:
            self._compaction_asked = True
            obj.forceLogCompaction()

    def _on_tick(self) -> None:
        """Tick thread: persist a changed voter set, run calls queued for this thread."""
        self._seal_recovery()
        voters = frozenset(self.voters())
        if voters != self._voters_seen:
            body = json.dumps({"voters": sorted(voters)}).encode()
            try:
                _write_atomically(os.path.join(self._data_dir, VOTERS_FILE), body)
                self._voters_seen = voters
                log.info("voters now %s", ", ".join(sorted(voters)))
            except OSError as exc:
                log.error("cannot persist the voter set: %s", exc)
        with self._tick_calls_lock:
            calls, self._tick_calls = self._tick_calls, []
        for call in calls:
            try:
                call()
            except Exception:
                log.exception("call on the tick thread failed")

    # -- thread seam ------------------------------------------------------

    def _notify(self, cmds: list[Any], results: list[Result]) -> None:
        """Tick thread → loop. Must not raise: pysyncobj would re-apply."""
        try:
            self._loop.call_soon_threadsafe(self._on_change, cmds, results)
        except RuntimeError:
            pass  # the loop is closed: the peer is shutting down

    def _on_raft_state(self, old: int, new: int) -> None:
        self._notify([], [])

    # -- proposing (loop side) --------------------------------------------

    async def propose(self, command: Command, timeout_s: float | None = None) -> Result:
        """Commit one command (grouped with others) and return its result.

        Raises UnencodableCommand at once, before anything is queued, for a
        command msgpack cannot encode: only this caller fails. Raises NoQuorum
        when nothing committed within ``timeout_s`` (default: the commit
        timeout); the outcome is then unknown, and retrying with the same
        ``cid`` is safe.
        """
        fut: asyncio.Future[Result] = self._loop.create_future()
        # Armed before anything can fail, so no caller waits past the timeout
        # whatever happens to the entry its command travels in.
        wait_s = self._commit_timeout_s if timeout_s is None else timeout_s
        timer = self._loop.call_later(wait_s, _expire, fut)
        try:
            self._pending.append((encode_command(command), fut))
            self._schedule_flush()
            return await fut
        finally:
            timer.cancel()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._in_flight < MAX_IN_FLIGHT and self._pending:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Pack waiting commands into entries. Every command is encoded
        already, so nothing here depends on what one caller proposed."""
        self._flush_scheduled = False
        # A caller that timed out or went away has its answer: drop its command.
        self._pending = [(enc, fut) for enc, fut in self._pending if not fut.done()]
        while self._pending and self._in_flight < MAX_IN_FLIGHT:
            take, size = 0, 0
            for encoded, _ in self._pending[:MAX_COMMANDS_PER_ENTRY]:
                if take and size + len(encoded) > MAX_ENTRY_BYTES:
                    break
                take += 1
                size += len(encoded)
            batch = self._pending[:take]
            del self._pending[:take]
            entry = _Entry([fut for _, fut in batch])
            self._in_flight += 1
            entry.timer = self._loop.call_later(
                self._commit_timeout_s, self._settle, entry, None, -1
            )

            def done(result: Any, err: int, entry: _Entry = entry) -> None:
                try:
                    self._loop.call_soon_threadsafe(self._settle, entry, result, err)
                except RuntimeError:
                    pass

            try:
                self._replica.apply_entry(join_entry([enc for enc, _ in batch]), callback=done)
            except Exception as exc:  # pysyncobj refused to queue it: fail this entry only
                log.exception("could not queue a log entry")
                self._finish(entry, ProposalFailed(f"proposal failed: {exc}"))

    def _settle(self, entry: _Entry, result: Any, err: int) -> None:
        if (
            err == FAIL_REASON.SUCCESS
            and isinstance(result, list)
            and len(result) == len(entry.futures)
        ):
            self._finish(entry, None, result)
            return
        reason = "timeout" if err == -1 else _FAIL_NAMES.get(err, str(err))
        if err == -1 or err in AMBIGUOUS or err in NOT_COMMITTED:
            self._finish(entry, NoQuorum(f"no commit: {reason}"))
        else:
            self._finish(entry, ProposalFailed(f"proposal failed: {reason}"))

    def _finish(
        self, entry: _Entry, exc: Exception | None, results: list[Result] | None = None
    ) -> None:
        """Answer every caller of ``entry`` once, and let the next entry go."""
        if entry.settled:
            return
        entry.settled = True
        if entry.timer is not None:
            entry.timer.cancel()
        self._in_flight -= 1
        for i, fut in enumerate(entry.futures):
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                assert results is not None
                fut.set_result(results[i])
        self._schedule_flush()

    # -- membership (loop side) -------------------------------------------

    async def add_voter(self, addr: str) -> None:
        """Make ``addr`` a voter; the caller starts that node afterwards.
        Raises ProposalFailed (REQUEST_DENIED) while another change is pending."""
        await self._membership_change(lambda cb: self._syncobj.addNodeToCluster(addr, callback=cb))

    async def remove_voter(self, addr: str) -> None:
        await self._membership_change(
            lambda cb: self._syncobj.removeNodeFromCluster(addr, callback=cb)
        )

    async def _membership_change(self, start: Callable[[Callable[[Any, int], None]], None]) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def settle(err: int) -> None:
            if fut.done():
                return
            if err == FAIL_REASON.SUCCESS:
                fut.set_result(None)
            elif err in AMBIGUOUS or err == FAIL_REASON.MISSING_LEADER or err == -1:
                fut.set_exception(NoQuorum(f"membership change: {_FAIL_NAMES.get(err, 'timeout')}"))
            else:
                fut.set_exception(ProposalFailed(f"membership change: {_FAIL_NAMES.get(err, err)}"))

        def done(result: Any, err: int) -> None:
            try:
                self._loop.call_soon_threadsafe(settle, err)
            except RuntimeError:
                pass

        # addNodeToCluster only queues the command: safe from this thread.
        start(done)
        handle = self._loop.call_later(self._commit_timeout_s, settle, -1)
        try:
            await fut
        finally:
            handle.cancel()

    async def transfer_leadership(self, timeout_s: float = 3.0) -> bool:
        """Hand leadership to the most caught-up voter; True once another leads."""
        if not self.is_leader:
            return True

        def transfer() -> None:
            self._syncobj.transferLeadership(callback=lambda res, err: None)

        deadline = self._loop.time() + timeout_s
        while self._loop.time() < deadline:
            # Denied while no follower is fully caught up: ask again shortly.
            with self._tick_calls_lock:
                self._tick_calls.append(transfer)
            for _ in range(10):
                await asyncio.sleep(0.05)
                leader = self.leader_addr
                if leader is not None and leader != self.self_addr:
                    return True
        return False

    # -- status -----------------------------------------------------------

    @property
    def term(self) -> int:
        return int(self._syncobj.raftCurrentTerm)

    @property
    def is_leader(self) -> bool:
        return bool(self._syncobj._isLeader())

    @property
    def leader_addr(self) -> str | None:
        leader = self._syncobj._getLeader()
        return None if leader is None else str(leader.id if hasattr(leader, "id") else leader)

    @property
    def has_quorum(self) -> bool:
        return bool(self._syncobj.hasQuorum)

    def match_index(self) -> dict[str, int]:
        """Per-follower replication progress, as the leader sees it."""
        status = self._retry(self._syncobj.getStatus)
        prefix = "match_idx_server_"
        return {k[len(prefix) :]: v for k, v in status.items() if k.startswith(prefix)}

    def status(self) -> dict[str, Any]:
        status = self._retry(self._syncobj.getStatus)
        return {
            "term": status["raft_term"],
            "leader": self.leader_addr,
            "is_leader": self.is_leader,
            "has_quorum": status["has_quorum"],
            "commit_idx": status["commit_idx"],
            "last_applied": status["last_applied"],
            "log_len": status["log_len"],
            "journal_syncs": self.journal.syncs,
        }

    @staticmethod
    def _retry(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """getStatus iterates the tick thread's dicts; a concurrent change makes
        it raise RuntimeError, which a second try almost always avoids."""
        for _ in range(5):
            try:
                return fn()
            except RuntimeError:
                continue
        return fn()

    def close(self) -> None:
        self._syncobj.destroy_synchronous()
        self.journal.sync()


__all__ = ["VOTERS_FILE", "RaftNode", "RaftTimers", "persisted_voters"]
