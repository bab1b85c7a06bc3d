"""Replicated commands: one frozen dataclass each, and their wire form.

Every command carries ``cid`` (a proposer-made id, so a retry after an
ambiguous Raft outcome is applied once) and ``at_ms`` (the proposer's clock:
the state machine never reads one).

On the wire a command is a msgpack map of plain values, ``{"op": ..., "cid":
..., "at_ms": ..., <fields>}``, never pickle. Many commands travel in one Raft
log entry (group commit): an entry is a msgpack list of such maps with the
format version in front. ``decode`` checks the shape and the type of every
field, so the state machine only ever sees well-typed commands; what a field's
value means (a known run, a free slot) is for the state machine to judge.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from enum import StrEnum
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import msgpack

from raftmesh.consensus.errors import ConsensusError, UnencodableCommand

# Unchanged since the commands became dataclasses: the wire shape is the same.
ENTRY_VERSION = 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Op(StrEnum):
    SUBMIT = "submit"
    ASSIGN = "assign"
    FINISH = "finish"
    RELEASE = "release"
    PEER_UP = "peer_up"
    PEER_DOWN = "peer_down"
    CONFIGURE = "configure"
    FAIL = "fail"
    CANCEL = "cancel"
    SETTLE = "settle"
    PEER_JOIN = "peer_join"
    PEER_DRAIN = "peer_drain"
    PEER_STOPPING = "peer_stopping"
    PEER_LEAVE = "peer_leave"
    # suspension (issue 11)
    SUSPEND = "suspend"
    WAKE = "wake"
    SIGNAL = "signal"
    PAUSE = "pause"
    RESUME = "resume"
    # schedules (consensus/schedules.py)
    SCHEDULE_SET = "schedule_set"
    SCHEDULE_DELETE = "schedule_delete"
    SCHEDULE_PAUSE = "schedule_pause"
    SCHEDULE_RESUME = "schedule_resume"
    FIRE_TICK = "fire_tick"


class CommandDecodeError(ConsensusError, ValueError):
    """A log entry or command that is not what this version writes."""


@dataclass(frozen=True)
class Command:
    op: ClassVar[Op]
    cid: str
    at_ms: int

    def to_wire(self) -> dict[str, Any]:
        # vars() holds the fields in declaration order, as fields() does, at a
        # fraction of its cost: every proposal is encoded through here.
        wire: dict[str, Any] = {"op": str(self.op)}
        for name, value in vars(self).items():
            wire[name] = _plain(value)
        return wire

    def encode(self) -> bytes:
        return _pack(self.to_wire())


# How long apply remembers a command id and its answer, so that a proposal
# retried with the same cid is applied once: the window of a log from before
# Configure.command_ttl_ms, and the longest one it allows.
COMMAND_TTL_MS = 10 * 60 * 1000


@dataclass(frozen=True)
class Submit(Command):
    """``runs``: each with id, agent, input, tenant, priority, labels, timeout_s,
    max_attempts, idempotency_key, parent_id, session, placement; a dead letter
    re-queued by the API also carries the epoch and attempts storage knows."""

    op: ClassVar[Op] = Op.SUBMIT
    runs: Sequence[Any]


@dataclass(frozen=True)
class Assign(Command):
    """``batch``: (run id, peer id, epoch) triples chosen by the leader of ``term``."""

    op: ClassVar[Op] = Op.ASSIGN
    term: int
    batch: Sequence[Any]


@dataclass(frozen=True)
class Finish(Command):
    op: ClassVar[Op] = Op.FINISH
    run: str
    epoch: int
    status: str
    error: str | None


@dataclass(frozen=True)
class Release(Command):
    op: ClassVar[Op] = Op.RELEASE
    run: str
    epoch: int


@dataclass(frozen=True)
class PeerUp(Command):
    """``incarnation`` changes on every process start, so the state machine can
    tell a restarted peer (whose in-memory runs are gone) from a live one."""

    op: ClassVar[Op] = Op.PEER_UP
    peer: str
    incarnation: str
    raft: str
    http: str
    slots: int
    labels: dict[str, Any]
    agents: list[Any] | None = None
    role: str = "voter"


@dataclass(frozen=True)
class PeerDown(Command):
    """Names the incarnation judged dead, so a late verdict cannot take down the
    same peer's next incarnation."""

    op: ClassVar[Op] = Op.PEER_DOWN
    peer: str
    incarnation: str


@dataclass(frozen=True)
class Configure(Command):
    """``retry``: backoff_base_ms, backoff_max_ms, retry_timeouts, count_lost_owner."""

    op: ClassVar[Op] = Op.CONFIGURE
    tenant_caps: dict[str, Any]
    default_tenant_cap: int | None
    tenant_max_queued: dict[str, Any] | None = None
    default_tenant_max_queued: int | None = None
    retry: dict[str, Any] | None = None
    # Queue order: milliseconds of waiting that earn a run one priority level.
    aging_ms: int = 0
    # A finish hands its freed slot to the next queued run in the same apply.
    handoff: bool = False
    # Runs each peer with slots may hold ready beyond them (eligibility.capacity).
    prefetch: int = 0
    # How long apply remembers command ids; absent in a log from before.
    command_ttl_ms: int = COMMAND_TTL_MS


@dataclass(frozen=True)
class Fail(Command):
    """The owner's attempt failed (``kind``: "error" or "timeout"); the state
    machine decides between a retry after backoff and a terminal outcome."""

    op: ClassVar[Op] = Op.FAIL
    run: str
    epoch: int
    kind: str
    error: str | None


@dataclass(frozen=True)
class Cancel(Command):
    """Cancel an active run and every active run descending from it."""

    op: ClassVar[Op] = Op.CANCEL
    run: str


@dataclass(frozen=True)
class Settle(Command):
    """Proposed once storage holds a settling run's outcome; evicts the run."""

    op: ClassVar[Op] = Op.SETTLE
    run: str


@dataclass(frozen=True)
class PeerJoin(Command):
    """Reserves ``peer`` for a process about to join (``raft`` is empty for
    an executor, which has no Raft listener)."""

    op: ClassVar[Op] = Op.PEER_JOIN
    peer: str
    raft: str
    http: str
    role: str


@dataclass(frozen=True)
class PeerDrain(Command):
    """``mode``: "finish", "release", or "" to undrain."""

    op: ClassVar[Op] = Op.PEER_DRAIN
    peer: str
    mode: str


@dataclass(frozen=True)
class PeerStopping(Command):
    op: ClassVar[Op] = Op.PEER_STOPPING
    peer: str
    incarnation: str


@dataclass(frozen=True)
class PeerLeave(Command):
    """``force`` skips the majority guard: only for voters a recovery removed
    from Raft (``mesh recover``)."""

    op: ClassVar[Op] = Op.PEER_LEAVE
    peer: str
    force: bool = False


# -- suspension (issue 11): waiting runs hold no slot ----------------------


@dataclass(frozen=True)
class Suspend(Command):
    """From the owner at ``epoch``: the run leaves its slot and waits for
    ``wait`` (the map consensus/waits.py reads), or parks PAUSED if an
    operator asked for a pause meanwhile."""

    op: ClassVar[Op] = Op.SUSPEND
    run: str
    epoch: int
    wait: dict[str, Any]


@dataclass(frozen=True)
class Wake(Command):
    """From the leader: the waiting ``runs`` whose wait is over at ``at_ms``
    go back to the queue; apply checks each again and skips the others."""

    op: ClassVar[Op] = Op.WAKE
    runs: list[Any]


@dataclass(frozen=True)
class Signal(Command):
    """Announces the signal storage already holds under (run, name, seq), so
    the leader knows to wake a run waiting for it."""

    op: ClassVar[Op] = Op.SIGNAL
    run: str
    name: str
    seq: int


@dataclass(frozen=True)
class Pause(Command):
    op: ClassVar[Op] = Op.PAUSE
    run: str


@dataclass(frozen=True)
class Resume(Command):
    op: ClassVar[Op] = Op.RESUME
    run: str


# -- schedules (consensus/schedules.py) ---------------------------------------


@dataclass(frozen=True)
class ScheduleSet(Command):
    """Create ``schedule``; setting an existing one to the same definition is
    harmless, to another is a conflict (delete it first)."""

    op: ClassVar[Op] = Op.SCHEDULE_SET
    schedule: str
    cron: str | None
    every_ms: int | None
    timezone: str
    agent: str
    input: Any
    tenant: str
    overlap: str
    catchup: str


@dataclass(frozen=True)
class ScheduleDelete(Command):
    op: ClassVar[Op] = Op.SCHEDULE_DELETE
    schedule: str


@dataclass(frozen=True)
class SchedulePause(Command):
    op: ClassVar[Op] = Op.SCHEDULE_PAUSE
    schedule: str


@dataclass(frozen=True)
class ScheduleResume(Command):
    """Ticks due while the schedule was paused are not fired."""

    op: ClassVar[Op] = Op.SCHEDULE_RESUME
    schedule: str


@dataclass(frozen=True)
class FireTick(Command):
    """From the leader: the tick at ``tick_ms`` is due. ``fire`` False advances
    past it without a run (a tick the catch-up policy drops)."""

    op: ClassVar[Op] = Op.FIRE_TICK
    schedule: str
    tick_ms: int
    fire: bool = True


COMMANDS: dict[str, type[Command]] = {
    cls.op: cls
    for cls in (
        Submit,
        Assign,
        Finish,
        Release,
        PeerUp,
        PeerDown,
        Configure,
        Fail,
        Cancel,
        Settle,
        PeerJoin,
        PeerDrain,
        PeerStopping,
        PeerLeave,
        Suspend,
        Wake,
        Signal,
        Pause,
        Resume,
        ScheduleSet,
        ScheduleDelete,
        SchedulePause,
        ScheduleResume,
        FireTick,
    )
}
_HINTS = {cls: get_type_hints(cls) for cls in COMMANDS.values()}


def decode(value: Any) -> Command:
    """A command from its wire form; a map with an unknown op, a missing field
    or a field of the wrong type raises CommandDecodeError. Keys this version
    does not know are ignored, so a newer proposer's additions do no harm."""
    decode_header(value)
    op = value.get("op")
    cls = COMMANDS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise CommandDecodeError(f"unknown op {op!r}")
    hints = _HINTS[cls]
    kwargs = {}
    for f in fields(cls):
        if f.name not in value:
            if f.default is MISSING and f.default_factory is MISSING:
                raise CommandDecodeError(f"{op} lacks field {f.name!r}")
            continue
        item = value[f.name]
        if not _conforms(item, hints[f.name]):
            raise CommandDecodeError(f"{op} field {f.name!r} must be {_describe(hints[f.name])}")
        kwargs[f.name] = item
    return cls(**kwargs)


def decode_header(value: Any) -> tuple[str, int]:
    """``cid`` and ``at_ms`` alone: what the state machine needs to remember a
    command (even a malformed one) by its id."""
    if not isinstance(value, dict):
        raise CommandDecodeError(f"a command is a map, not {type(value).__name__}")
    cid, at_ms = value.get("cid"), value.get("at_ms")
    if not isinstance(cid, str) or not isinstance(at_ms, int) or not _conforms(at_ms, int):
        raise CommandDecodeError("a command needs a text cid and an integer at_ms")
    return cid, at_ms


def decode_bytes(payload: bytes) -> Command:
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CommandDecodeError(f"undecodable command: {exc}") from exc
    return decode(value)


def encode_command(command: Command) -> bytes:
    """One command's msgpack form, as it sits inside an entry."""
    return command.encode()


def join_entry(encoded: list[bytes]) -> bytes:
    """The entry holding commands already encoded one by one: the same bytes
    ``encode_entry`` gives for them, so nothing is encoded twice."""
    packer = msgpack.Packer(use_bin_type=True)
    head = packer.pack_array_header(2) + packer.pack(ENTRY_VERSION)
    return head + packer.pack_array_header(len(encoded)) + b"".join(encoded)


def encode_entry(commands: Sequence[Command]) -> bytes:
    return join_entry([cmd.encode() for cmd in commands])


def decode_entry(payload: bytes) -> list[Any]:
    """The entry's commands in wire form: each is decoded (and, if malformed,
    refused) by the state machine one by one, so one bad command cannot take
    the good ones in its entry down with it."""
    try:
        version, commands = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CommandDecodeError(f"undecodable log entry: {exc}") from exc
    if version != ENTRY_VERSION or not isinstance(commands, list):
        raise CommandDecodeError(f"unsupported log entry version {version!r}")
    return commands


def _pack(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnencodableCommand(f"command {value.get('op')!r} cannot be encoded: {exc}") from exc


def _plain(value: Any) -> Any:
    """Tuples (a batch's triples) become lists, as msgpack would read them back."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _conforms(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in get_args(hint))
    if hint is int:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and INT64_MIN <= value <= INT64_MAX
        )
    if hint is float:
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if hint is str or hint is bool:
        return isinstance(value, hint)
    if origin in (list, Sequence):
        return isinstance(value, list | tuple)
    if origin is dict:
        return isinstance(value, dict)
    raise TypeError(f"no wire check for {hint!r}")  # a field type added without one


def _describe(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in get_args(hint))
    if hint is type(None):
        return "null"
    origin = get_origin(hint)
    if origin in (list, Sequence):
        return "a list"
    if origin is dict:
        return "a map"
    return getattr(hint, "__name__", str(hint))
