"""Pieces both SQL backends share, so their fencing and row mapping cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from raftmesh.consensus.spec import RunSpec
from raftmesh.consensus.status import TERMINAL_STATUSES
from raftmesh.storage.base import AlreadyFinished, RunRow, StaleEpoch

# The spec fields that are columns of their own (what lists and filters read);
# every other RunSpec field travels in the ``options`` JSON column, so a field
# added to RunSpec is stored without a change here.
SPEC_COLUMNS = (
    "agent",
    "input",
    "tenant",
    "priority",
    "labels",
    "timeout_s",
    "max_attempts",
    "idempotency_key",
    "parent_id",
)
# Column order of every full-row SELECT; run_from_row reads columns by name.
RUN_COLUMNS = ", ".join(
    ("id", *SPEC_COLUMNS, "options", "submitted_at_ms", "status", "owner", "epoch", "attempts")
    + ("result", "error", "started_at_ms", "finished_at_ms")
)


class Row(Protocol):
    """asyncpg.Record and sqlite3.Row both index by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


def encode_labels(labels: Mapping[str, str]) -> str:
    # Sorted keys: equal label sets are stored as equal text.
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def spec_values(spec: RunSpec) -> tuple[Any, ...]:
    """The spec as the columns SPEC_COLUMNS, then ``options``, in that order;
    ``spec.input`` is already packed (bytes)."""
    wire = spec.to_wire()
    wire["labels"] = encode_labels(spec.labels)
    options = {k: v for k, v in wire.items() if k not in SPEC_COLUMNS}
    return (*(wire[name] for name in SPEC_COLUMNS), json.dumps(options, sort_keys=True))


def spec_from_row(row: Row) -> RunSpec:
    """Rows written before the ``options`` column existed read it as {}."""
    wire = {name: row[name] for name in SPEC_COLUMNS}
    wire["input"] = bytes(wire["input"])
    wire["labels"] = json.loads(wire["labels"])
    return RunSpec.from_wire({**wire, **json.loads(row["options"] or "{}")})


def run_from_row(row: Row) -> RunRow:
    return RunRow(
        id=row["id"],
        spec=spec_from_row(row),
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


def run_filters(
    status: str | None,
    tenant: str | None,
    agent: str | None,
    placeholder: Callable[[int], str],
) -> tuple[str, list[str]]:
    """The WHERE clause list_runs shares between backends; ``placeholder(i)``
    spells the i-th (1-based) parameter in the backend's dialect."""
    clauses: list[str] = []
    params: list[str] = []
    for column, value in (("status", status), ("tenant", tenant), ("agent", agent)):
        if value is not None:
            params.append(value)
            clauses.append(f"{column} = {placeholder(len(params))}")
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params
