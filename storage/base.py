"""The storage contract every backend honours.

Storage is where runs outlive Raft: Raft state holds only active runs, storage
keeps history, checkpoints, events and results. Every write that belongs to an
attempt carries the attempt's epoch and is fenced in the same transaction, so a
paused or partitioned former owner can change nothing once a newer epoch has
claimed the run (DESIGN.md, Fencing).

Payloads (input, step values, event data, results) are opaque bytes here; the
runner encodes them with msgpack before they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from raftmesh.consensus.spec import RunSpec


class StorageError(Exception):
    """Root of every storage error."""


class StaleEpoch(StorageError):
    """A write or claim carried an epoch older than the one that owns the run."""

    def __init__(self, run_id: str, epoch: int, current: int) -> None:
        super().__init__(f"run {run_id}: epoch {epoch} is stale, epoch {current} owns it")
        self.run_id = run_id
        self.epoch = epoch
        self.current = current


class AlreadyFinished(StaleEpoch):
    """put_result found a terminal outcome already stored.

    A StaleEpoch, so a writer that stops on StaleEpoch stops here too, but
    with a message that names the real reason: a result is written once.
    """

    def __init__(self, run_id: str, epoch: int, status: str) -> None:
        StorageError.__init__(
            self, f"run {run_id}: already {status}, epoch {epoch} cannot write another outcome"
        )
        self.run_id = run_id
        self.epoch = epoch
        self.current = epoch
        self.status = status


class StorageUnavailable(StorageError):
    """The database could not be reached; the caller may retry later."""


@dataclass(frozen=True)
class RunRow:
    """A run as storage remembers it, also long after it left Raft state."""

    id: str
    # Everything a retry needs to run the run again; ``spec.input`` is packed.
    spec: RunSpec
    submitted_at_ms: int = 0
    status: str = "queued"
    owner: str | None = None
    epoch: int = 0
    attempts: int = 0
    result: bytes | None = None
    error: str | None = None
    started_at_ms: int | None = None
    finished_at_ms: int | None = None


@dataclass(frozen=True)
class Claim:
    """What a new owner learns when it claims a run.

    ``finished`` is set when a result was already written by an earlier epoch:
    the new owner must then report that outcome instead of running the agent
    again (exactly-once completion).
    """

    run: RunRow
    finished: bool


@dataclass(frozen=True)
class Step:
    seq: int
    name: str
    value: bytes
    epoch: int
    peer: str
    at_ms: int


@dataclass(frozen=True)
class Event:
    run_id: str
    seq: int
    kind: str
    data: bytes
    epoch: int
    at_ms: int


@dataclass(frozen=True)
class SignalStored:
    """Where ``put_signal`` keeps a signal; ``created`` is False when the
    idempotency key had already stored it (``seq`` is then the first one's)."""

    seq: int
    created: bool


@dataclass(frozen=True)
class SignalRow:
    run_id: str
    name: str
    seq: int
    data: bytes
    idempotency_key: str | None
    at_ms: int


NotifyCallback = Callable[[str], object]


class Notifier(Protocol):
    """Tells this process when any peer appends an event, so event streams
    wake at once instead of at their next re-read (PostgreSQL LISTEN/NOTIFY)."""

    async def listen(self, callback: NotifyCallback) -> None:
        """Call ``callback(run_id)`` for every event appended from now on,
        by any process, until the store closes. Best effort: a notification
        lost while reconnecting is made up for by the re-read."""


@runtime_checkable
class Store(Protocol):
    """One interface, two backends (PostgreSQL for many hosts, SQLite for one)."""

    async def open(self) -> None:
        """Connect and apply pending schema migrations (safe to race with other peers)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StorageUnavailable unless a trivial query succeeds."""

    def notifier(self) -> Notifier | None:
        """The backend's notifications of new events; None where it has none
        (SQLite), and watchers then re-read on a short period."""

    async def record_runs(self, runs: list[RunRow]) -> None:
        """Insert runs as queued; rows that already exist are left untouched."""

    async def claim(self, run: RunRow, epoch: int, peer: str, now_ms: int) -> Claim:
        """Make ``epoch`` the run's owner epoch if it is newer than the stored one.

        Inserts the row from ``run`` when absent. Sets owner, status=running,
        attempts += 1, started_at. Raises StaleEpoch if the stored epoch is >=
        ``epoch``.

        When a terminal status is already stored the epoch and owner still
        advance (so the older epoch is fenced) but status, result, attempts and
        started_at are kept, and the claim comes back with ``finished=True``.
        """

    async def put_step(
        self, run_id: str, epoch: int, seq: int, name: str, value: bytes, peer: str, now_ms: int
    ) -> None:
        """Checkpoint one step result; fenced (StaleEpoch unless epoch is the run's epoch).

        The first value stored for a seq wins: a retried write is harmless and a
        checkpoint that a resumed run may already have replayed never changes.
        """

    async def load_steps(self, run_id: str) -> list[Step]:
        """Every checkpointed step of the run, by seq."""

    async def append_event(
        self, run_id: str, epoch: int, kind: str, data: bytes, now_ms: int
    ) -> int:
        """Append a durable event; fenced; returns its per-run sequence number (1, 2, ...)."""

    async def read_events(
        self, run_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[Event]: ...

    async def put_result(
        self,
        run_id: str,
        epoch: int,
        status: str,
        result: bytes | None,
        error: str | None,
        now_ms: int,
    ) -> None:
        """Write the run's terminal outcome once; fenced.

        Raises StaleEpoch if the epoch is not the run's, and AlreadyFinished
        (a StaleEpoch) if a terminal outcome is already stored: a result is
        written once. ValueError if ``status`` is not terminal.
        """

    async def set_terminal(self, run_id: str, status: str, error: str | None, now_ms: int) -> None:
        """Record a terminal status decided by the mesh rather than by an owner
        (cancelled, failed after the last attempt was lost). Unfenced, but never
        overwrites a stored result or an earlier terminal status; a run storage
        has never seen is left alone. ValueError if ``status`` is not terminal."""

    async def reopen(self, run_id: str) -> bool:
        """Put a dead letter (failed or timed_out) back to queued, clearing its
        outcome, for a retry the operator asked for; checkpoints are kept and
        the epoch stays, so the next owner's claim fences every older one.
        False (nothing changed) for any other status or an unknown run."""

    async def get_run(self, run_id: str) -> RunRow | None: ...

    async def put_signal(
        self, run_id: str, name: str, data: bytes, idempotency_key: str | None, at_ms: int
    ) -> SignalStored:
        """Store a signal under the next seq of (run, name), counted from 0 and
        dense, assigned in the transaction; a repeated idempotency key stores
        nothing and answers the first signal's seq. Unfenced: anyone the API
        lets signal a run may; the run consumes the seqs in order."""

    async def get_signal(self, run_id: str, name: str, seq: int) -> bytes | None:
        """The data of one signal, None while it is not stored."""

    async def list_signals(self, run_id: str) -> list[SignalRow]:
        """Every signal of the run, by name, then seq."""

    async def list_runs(
        self,
        status: str | None = None,
        limit: int = 100,
        *,
        tenant: str | None = None,
        agent: str | None = None,
        offset: int = 0,
    ) -> list[RunRow]:
        """Newest first; each filter given narrows the list; ``offset`` pages."""
