"""What applying a command answers: one frozen dataclass per kind of answer.

A refusal is ``Rejected(reason, message)``: ``reason`` is a ``Rejection`` the
API maps to an HTTP status in one table (mesh/errors.py), ``message`` says it
to a person. Results are remembered per command id (a retry gets the first
answer) and so travel in snapshots: ``to_wire``/``from_wire`` turn them into
plain msgpack values and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from raftmesh.consensus.status import RunStatus


class Rejection(StrEnum):
    # Not a command: undecodable, an unknown op, a field of the wrong type.
    MALFORMED = "malformed"
    # A well-formed command with a value the mesh does not accept.
    INVALID = "invalid"
    UNKNOWN_RUN = "unknown_run"
    UNKNOWN_PEER = "unknown_peer"
    # The sender is not the run's current owner (or the epoch is not the next).
    STALE_EPOCH = "stale_epoch"
    # The state does not allow it now: an id in use, the last voter, a run ending.
    CONFLICT = "conflict"
    # Backpressure: the tenant's queued-run maximum is reached.
    TENANT_QUEUE_FULL = "tenant_queue_full"
    UNKNOWN_SCHEDULE = "unknown_schedule"
    # The last guard of apply caught something no check foresaw.
    INTERNAL = "internal"


@dataclass(frozen=True)
class Rejected:
    reason: Rejection
    message: str
    ok: ClassVar[bool] = False


@dataclass(frozen=True)
class Done:
    """Accepted, nothing more to say (finish, release, configure, drain, stopping)."""

    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class Finished:
    """A finish that handed the slot it freed to the next queued run: that
    run now runs on the same peer under its next epoch."""

    handed_off: str
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class RunOutcome:
    """One run of a submit batch: created, an existing run, or refused."""

    id: str | None
    created: bool = False
    rejection: Rejection | None = None
    message: str | None = None


@dataclass(frozen=True)
class Submitted:
    runs: list[RunOutcome]
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class Assigned:
    accepted: list[str]
    # run id -> why apply refused that item
    rejected: dict[str, str] = field(default_factory=dict)
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class Requeued:
    """A peer came back, went down or left: how many of its runs were requeued."""

    requeued: int
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class Joined:
    created: bool
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class AttemptFailed:
    retry: bool
    not_before_ms: int | None = None
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class CancelRequested:
    status: RunStatus
    cancelled: list[str]
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class Settled:
    outcome: RunStatus | None
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class Suspended:
    """Where a suspended run landed: WAITING, PAUSED (a pause was requested)
    or SETTLING (it was cancelled meanwhile)."""

    status: RunStatus
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class ScheduleSaved:
    created: bool
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class Woken:
    woken: list[str]
    # runs not woken: unknown, not waiting, or their wait is not over
    skipped: list[str] = field(default_factory=list)
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class Signalled:
    """``announced``: how many signals of that name the run has now."""

    announced: int
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class PauseChanged:
    """The run's status after a pause or resume: PAUSED or QUEUED, or RUNNING
    with the request to pause set (pause) or withdrawn (resume)."""

    status: RunStatus
    pause_requested: bool = False
    ok: ClassVar[bool] = True


@dataclass(frozen=True)
class TickFired:
    """``run``: the run the tick started, or None with ``skipped`` saying why."""

    run: str | None
    skipped: str | None = None
    ok: ClassVar[bool] = True


Result = (
    Rejected
    | Done
    | Finished
    | Submitted
    | Assigned
    | Requeued
    | Joined
    | AttemptFailed
    | CancelRequested
    | Settled
    | Suspended
    | Woken
    | Signalled
    | PauseChanged
    | ScheduleSaved
    | TickFired
)
_KINDS: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        Rejected,
        Done,
        Finished,
        Submitted,
        Assigned,
        Requeued,
        Joined,
        AttemptFailed,
        CancelRequested,
        Settled,
        Suspended,
        Woken,
        Signalled,
        PauseChanged,
        ScheduleSaved,
        TickFired,
    )
}


def to_wire(result: Result) -> list[Any]:
    # vars(), not dataclasses.fields(): a snapshot turns every remembered
    # result into this, thousands at a time, and fields() was most of the cost.
    values = dict(vars(result))
    if isinstance(result, Submitted):
        values["runs"] = [[r.id, r.created, r.rejection, r.message] for r in result.runs]
    return [type(result).__name__, values]


def from_wire(data: Any) -> Result:
    """The inverse of ``to_wire``; a snapshot is trusted (this node or its
    leader wrote it), so a wrong shape raises."""
    kind, values = data
    if kind == "Submitted":
        values = {"runs": [_run_outcome(*r) for r in values["runs"]]}
    elif kind == "Rejected":
        values = {**values, "reason": Rejection(values["reason"])}
    return _KINDS[kind](**values)


def _run_outcome(
    run_id: str | None, created: bool, rejection: str | None, message: str | None
) -> RunOutcome:
    return RunOutcome(run_id, created, None if rejection is None else Rejection(rejection), message)


def from_legacy(data: dict[str, Any]) -> Result:
    """A result remembered by a version-1 snapshot (a map with "ok"), so a
    retry of a command applied before the upgrade still gets its answer."""
    if not data.get("ok"):
        return Rejected(Rejection.INVALID, str(data.get("error")))
    if "runs" in data:
        return Submitted(
            [
                RunOutcome(
                    o.get("id"),
                    bool(o.get("created")),
                    None if "error" not in o else _legacy_rejection(o.get("code")),
                    o.get("error"),
                )
                for o in data["runs"]
            ]
        )
    for kind, keys in _LEGACY_KEYS:
        if keys <= data.keys():
            return kind(**{k: data[k] for k in keys | (data.keys() & _OPTIONAL.get(kind, set()))})
    return Done()


_LEGACY_KEYS: list[tuple[type[Any], set[str]]] = [
    (Assigned, {"accepted", "rejected"}),
    (AttemptFailed, {"retry"}),
    (CancelRequested, {"status", "cancelled"}),
    (Settled, {"outcome"}),
    (Requeued, {"requeued"}),
    (Joined, {"created"}),
]
_OPTIONAL: dict[type[Any], set[str]] = {AttemptFailed: {"not_before_ms"}}


def _legacy_rejection(code: Any) -> Rejection:
    return Rejection.TENANT_QUEUE_FULL if code == "tenant_queue_full" else Rejection.INVALID
