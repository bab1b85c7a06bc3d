"""The HTTP API's request and response types (msgspec).

Requests are checked against these types, and the OpenAPI document is
generated from them, so the two cannot drift. Bounds come from where a value
ends up: Raft carries it as msgpack (64-bit integers at most) and storage keeps
``priority`` and ``max_attempts`` in INTEGER columns, which on PostgreSQL are 32
bits. A value outside them used to be accepted here and then fail deep inside
the mesh (an unencodable Raft entry, a claim that could never succeed).
"""

import functools
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from raftmesh.consensus.model import EXECUTOR, VOTER
from raftmesh.consensus.schedules import SCHEDULE_ID
from raftmesh.consensus.spec import INT64_MAX, MAX_TIMEOUT_S, PLACEMENTS
from raftmesh.mesh.errors import BadRequest
from raftmesh.runner.context import BUDGET_KEYS
from raftmesh.runner.isolation import ISOLATION_MODES
from raftmesh.runner.payload import pack

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Deeper bodies are refused before anything recurses over them (JSON
# decoding, msgpack, the agent): a 400 instead of a RecursionError.
MAX_NESTING = 64
MAX_IDEMPOTENCY_KEY_BYTES = 256
MAX_LABELS = 64
# events.seq is an INTEGER column: no event has a larger sequence number.
MAX_EVENT_SEQ = INT32_MAX

RULES = {
    "agent": "a non-empty string of at most 256 characters: the agent to run",
    "input": "any JSON value: the agent's input",
    "idempotency_key": (
        f"a string of at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes (UTF-8): "
        "submissions with the same key make one run"
    ),
    "tenant": "a string of at most 256 characters",
    "priority": f"an integer from {INT32_MIN} to {INT32_MAX} (higher runs first)",
    "labels": (
        f"an object of at most {MAX_LABELS} string labels "
        "(keys of 1 to 128 characters, values of at most 256)"
    ),
    "timeout_s": f"a number of seconds greater than 0 and at most {MAX_TIMEOUT_S:.0f}",
    "max_attempts": f"an integer from 1 to {INT32_MAX}",
    "budget": (f"an object mapping {' or '.join(BUDGET_KEYS)} to integers from 0 to {INT64_MAX}"),
    "isolation": f"one of {', '.join(ISOLATION_MODES)}",
    "memory_limit_mb": f"an integer from 16 to {INT32_MAX}",
    "session": "a string of at most 256 characters",
    "placement": f"one of {', '.join(PLACEMENTS)}",
    "id": "a non-empty string of at most 128 characters: the new peer's id",
    "http": "HOST:PORT with a port from 1 to 65535: the new peer's API address",
    "raft": "HOST:PORT with a port from 1 to 65535: a voter's Raft address",
    "role": f"one of {VOTER}, {EXECUTOR}",
    "data": "any JSON value, integers within 64 bits: what the waiting call returns",
    "signal_key": (
        f"a string of at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes (UTF-8, no NUL): "
        "signals to one run and name with the same key are delivered once"
    ),
}
# A signal name, in the path of POST /v1/runs/{id}/signals/{name}.
SIGNAL_NAME_RULE = "1 to 128 of the characters A-Z a-z 0-9 _ . : -"


def _rule(name: str, **bounds: Any) -> Meta:
    return Meta(description=RULES[name], **bounds)


_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_ADDRESS = rf"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/]+):{_PORT}$"

AgentName = Annotated[str, _rule("agent", min_length=1, max_length=256)]
AgentInput = Annotated[Any, _rule("input")]
IdempotencyKey = Annotated[str, _rule("idempotency_key", max_length=MAX_IDEMPOTENCY_KEY_BYTES)]
Tenant = Annotated[str, _rule("tenant", max_length=256)]
Priority = Annotated[int, _rule("priority", ge=INT32_MIN, le=INT32_MAX)]
LabelKey = Annotated[str, Meta(min_length=1, max_length=128)]
LabelValue = Annotated[str, Meta(max_length=256)]
Labels = Annotated[dict[LabelKey, LabelValue], _rule("labels", max_length=MAX_LABELS)]
TimeoutS = Annotated[float, _rule("timeout_s", gt=0, le=MAX_TIMEOUT_S)]
MaxAttempts = Annotated[int, _rule("max_attempts", ge=1, le=INT32_MAX)]
# Spelled out for the type checker; tests/test_schemas.py holds them equal to
# the runtime's own tuples.
BudgetKey = Literal["model_calls", "tokens"]
IsolationMode = Literal["task", "process"]
PlacementName = Literal["least-loaded", "round-robin", "consistent-hash"]
RoleName = Literal["voter", "executor"]
Budget = Annotated[dict[BudgetKey, Annotated[int, Meta(ge=0, le=INT64_MAX)]], _rule("budget")]
Isolation = Annotated[IsolationMode, _rule("isolation")]
MemoryLimitMb = Annotated[int, _rule("memory_limit_mb", ge=16, le=INT32_MAX)]
Session = Annotated[str, _rule("session", max_length=256)]
Placement = Annotated[PlacementName, _rule("placement")]


class SubmitRequest(Struct, forbid_unknown_fields=True):
    """A run to submit (``POST /v1/runs``); absent and null fields take the defaults."""

    agent: AgentName
    input: AgentInput
    idempotency_key: IdempotencyKey | None = None
    tenant: Tenant | None = None
    priority: Priority | None = None
    labels: Labels | None = None
    timeout_s: TimeoutS | None = None
    max_attempts: MaxAttempts | None = None
    budget: Budget | None = None
    isolation: Isolation | None = None
    memory_limit_mb: MemoryLimitMb | None = None
    session: Session | None = None
    placement: Placement | None = None

    def __post_init__(self) -> None:
        key = self.idempotency_key
        if key is not None and len(key.encode()) > MAX_IDEMPOTENCY_KEY_BYTES:
            raise ValueError(f"field 'idempotency_key' must be {RULES['idempotency_key']}")


class SignalRequest(Struct, forbid_unknown_fields=True):
    """A signal to a run (``POST /v1/runs/{id}/signals/{name}``)."""

    data: Annotated[Any, _rule("data")] = None
    idempotency_key: (
        Annotated[str, _rule("signal_key", max_length=MAX_IDEMPOTENCY_KEY_BYTES)] | None
    ) = None

    def __post_init__(self) -> None:
        if not packable(self.data):
            raise ValueError(f"field 'data' must be {RULES['data']}")
        key = self.idempotency_key
        if key is not None and (
            not storable_text(key) or len(key.encode()) > MAX_IDEMPOTENCY_KEY_BYTES
        ):
            raise ValueError(f"field 'idempotency_key' must be {RULES['signal_key']}")


def packable(value: Any) -> bool:
    """A value msgpack can carry: storage keeps a signal's data packed, and an
    integer beyond 64 bits would fail there, after the request was taken."""
    try:
        pack(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def storable_text(text: str) -> bool:
    """Text a storage column holds: UTF-8 (no lone surrogate) without NUL,
    which PostgreSQL text refuses."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


PeerId = Annotated[str, _rule("id", min_length=1, max_length=128)]
HttpAddress = Annotated[str, _rule("http", pattern=_ADDRESS)]
RaftAddress = Annotated[str, _rule("raft", pattern=_ADDRESS)]
Role = Annotated[RoleName, _rule("role")]


class JoinRequest(Struct, forbid_unknown_fields=True):
    """A peer to admit (``POST /v1/peers``); an executor has no Raft address."""

    id: PeerId
    http: HttpAddress
    role: Role | None = None
    raft: RaftAddress | None = None

    def __post_init__(self) -> None:
        if (self.role or VOTER) == VOTER and not self.raft:
            raise ValueError(f"field 'raft' must be {RULES['raft']}: a voter needs one")


# -- responses (documented; the peer builds them as plain dicts) ---------------


class ErrorDetail(Struct):
    code: str
    message: str


class ErrorResponse(Struct):
    """Every 4xx and 5xx answer."""

    error: ErrorDetail


class SubmitResponse(Struct):
    id: str
    status: Literal["queued", "existing"]


class SignalResponse(Struct):
    """``seq``: the signal's place among the run's signals of that name (from 0);
    ``duplicate``: the idempotency key had stored it already."""

    run_id: str
    name: str
    seq: int
    duplicate: bool


class Failures(Struct):
    error: int
    timeout: int
    lost_owner: int


class WaitView(Struct, forbid_unknown_fields=True):
    """What a waiting run waits for (consensus/waits.py): a timer (``due_at``),
    a signal (``signal``, with ``due_at`` as its timeout if any) or children
    (the first ``children`` ids of ``children_total``). A run paused in a wait
    keeps it."""

    kind: str
    due_at: float | None
    signal: str | None
    children: list[str] | None
    children_total: int | None


class RunView(Struct, forbid_unknown_fields=True):
    """A run as ``GET /v1/runs/{id}`` shows it: active runs come from the
    replicated state (with the fields marked active), finished ones from storage."""

    id: str
    agent: str
    status: str
    owner: str | None
    epoch: int
    attempts: int
    result: Any
    error: str | None
    tenant: str
    priority: int
    labels: dict[str, str]
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool | None = None
    retry_at: float | None = None
    failures: Failures | None = None
    session: str | None = None
    waiting_for: str | None = None
    pause_requested: bool | None = None
    wait: WaitView | None = None


class RunList(Struct):
    runs: list[RunView]


class JoinResponse(Struct):
    id: str
    role: str
    voters: list[str]


# -- schedules (consensus/schedules.py, mesh/schedules.py) --------------------

SCHEDULE_RULES = {
    "id": "1 to 128 characters of A-Z a-z 0-9 _ . : -: the schedule's id",
    "cron": (
        "a cron expression of at most 256 characters (5 fields; a 6th is seconds, "
        "a 7th the year), parsed by croniter"
    ),
    "every_s": "a period in seconds from 1 to 31622400",
    "timezone": "an IANA time zone name such as Europe/Paris (default UTC)",
    "overlap": "one of skip, allow, cancel_previous (default skip)",
    "catchup": "one of none, one, all (default none)",
}


def _schedule_rule(name: str, **bounds: Any) -> Meta:
    return Meta(description=SCHEDULE_RULES[name], **bounds)


# Anchored for the document's readers; apply matches the id whole as well
# (consensus/schedules.SCHEDULE_ID), so a trailing newline is refused there.
ScheduleId = Annotated[str, _schedule_rule("id", pattern=f"^{SCHEDULE_ID.pattern}$")]
CronExpression = Annotated[str, _schedule_rule("cron", min_length=1, max_length=256)]
EverySeconds = Annotated[float, _schedule_rule("every_s", ge=1, le=366 * 24 * 3600)]
TimeZone = Annotated[str, _schedule_rule("timezone", min_length=1, max_length=64)]
Overlap = Annotated[Literal["skip", "allow", "cancel_previous"], _schedule_rule("overlap")]
Catchup = Annotated[Literal["none", "one", "all"], _schedule_rule("catchup")]


class ScheduleRequest(Struct, forbid_unknown_fields=True):
    """A schedule to create (``POST /v1/schedules``): exactly one of ``cron``
    and ``every_s``; each tick runs ``agent`` on ``input`` as ``tenant``."""

    id: ScheduleId
    agent: AgentName
    input: AgentInput
    cron: CronExpression | None = None
    every_s: EverySeconds | None = None
    timezone: TimeZone | None = None
    tenant: Tenant | None = None
    overlap: Overlap | None = None
    catchup: Catchup | None = None


class ScheduleView(Struct, forbid_unknown_fields=True):
    """A schedule and where it stands: ``fired`` ticks started a run,
    ``skipped`` ones were dropped (overlap, catch-up, a refused run)."""

    id: str
    cron: str | None
    every_s: float | None
    timezone: str
    agent: str
    input: Any
    tenant: str
    overlap: str
    catchup: str
    paused: bool
    created_at: float
    last_tick_at: float | None
    next_tick_at: float | None
    last_run: str | None
    fired: int
    skipped: int


class ScheduleList(Struct):
    schedules: list[ScheduleView]


T = TypeVar("T", bound=Struct)

_FIELD = re.compile(r"`\$\.(\w+)")
_MISSING = re.compile(r"missing required field `(\w+)`")


def parse_request(
    body: Any,
    kind: type[T],
    hints: dict[str, str] | None = None,
    rules: dict[str, str] | None = None,
) -> T:
    """``body`` (decoded JSON) as a ``kind``, or BadRequest saying which field
    is wrong and what it must be. ``hints`` replace the message of a missing
    field, ``rules`` the RULES of this kind's fields (a schedule's ``id`` is
    not a peer's)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = set(body) - _field_names(kind)
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(_explain(str(exc), body, hints or {}, RULES | (rules or {}))) from None


@functools.cache
def _field_names(kind: type[Struct]) -> frozenset[str]:
    # msgspec evaluates a struct's annotations on every fields() call: a
    # twentieth of a peer's event loop under a stream of submissions.
    return frozenset(f.name for f in msgspec.structs.fields(kind))


def _explain(error: str, body: dict[str, Any], hints: dict[str, str], rules: dict[str, str]) -> str:
    missing = _MISSING.search(error)
    if missing:
        name = missing.group(1)
        return hints.get(name) or f"missing field '{name}': {rules.get(name, 'required')}"
    field = _FIELD.search(error)
    if field and field.group(1) in rules:
        name = field.group(1)
        got = repr(body.get(name))
        got = got if len(got) <= 80 else got[:77] + "..."
        return f"field '{name}' must be {rules[name]}; got {got}"
    return error


def check_nesting(value: Any, limit: int = MAX_NESTING) -> None:
    """BadRequest if ``value`` nests lists or objects deeper than ``limit``.
    Iterative, so the check itself cannot exhaust the stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            raise BadRequest(nesting_message(limit))
        stack.extend((child, depth + 1) for child in children)


def nesting_message(limit: int = MAX_NESTING) -> str:
    return (
        f"request body is nested more than {limit} levels deep; "
        "flatten the input or pass a reference to it"
    )
