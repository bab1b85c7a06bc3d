"""Pieces both SQL backends share, so their fencing and row mapping cannot drift apart."""

from __future__ import annotations

import json
from typing import Any, Protocol

from raftmesh.consensus.status import TERMINAL_STATUSES
from raftmesh.storage.base import AlreadyFinished, RunRow, StaleEpoch

# Column order of every full-row SELECT; run_from_row reads columns by name.
RUN_COLUMNS = (
    "id, agent, input, tenant, priority, labels, timeout_s, max_attempts, idempotency_key, "
    "parent_id, submitted_at_ms, status, owner, epoch, attempts, result, error, "
    "started_at_ms, finished_at_ms"
)


class Row(Protocol):
    """asyncpg.Record and sqlite3.Row both index by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


def encode_labels(labels: dict[str, str]) -> str:
    # Sorted keys: equal label sets are stored as equal text.
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def run_from_row(row: Row) -> RunRow:
    return RunRow(
        id=row["id"],
        agent=row["agent"],
        input=bytes(row["input"]),
        tenant=row["tenant"],
        priority=row["priority"],
        labels=json.loads(row["labels"]),
        timeout_s=row["timeout_s"],
        max_attempts=row["max_attempts"],
        idempotency_key=row["idempotency_key"],
        parent_id=row["parent_id"],
        submitted_at_ms=row["submitted_at_ms"],
        status=row["status"],
        owner=row["owner"],
        epoch=row["epoch"],
        attempts=row["attempts"],
        result=None if row["result"] is None else bytes(row["result"]),
        error=row["error"],
        started_at_ms=row["started_at_ms"],
        finished_at_ms=row["finished_at_ms"],
    )


def fence(run_id: str, epoch: int, stored: Row | None, enforce: bool = True) -> Row:
    """Refuse a write unless ``epoch`` owns the run; ``stored`` is the locked row.

    No row means nobody ever claimed the run, so no writer can own it; the
    error then reports epoch 0. ``enforce=False`` is the unsafe debug mode
    (``unsafe_disable_fencing``) that lets the chaos checker prove it can see
    the stale writes fencing exists to stop; it only skips the epoch check.
    """
    if stored is None:
        raise StaleEpoch(run_id, epoch, 0)
    if enforce and stored["epoch"] != epoch:
        raise StaleEpoch(run_id, epoch, stored["epoch"])
    return stored


def fence_result(run_id: str, epoch: int, stored: Row | None, enforce: bool = True) -> None:
    """put_result's fence: the epoch must own the run and no outcome may be stored yet."""
    status = fence(run_id, epoch, stored, enforce)["status"]
    if status in TERMINAL_STATUSES:
        raise AlreadyFinished(run_id, epoch, status)


def require_terminal(status: str) -> None:
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"{status!r} is not a terminal status {sorted(TERMINAL_STATUSES)}")
