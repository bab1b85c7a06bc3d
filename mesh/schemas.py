"""The HTTP API's request and response types (msgspec).

Requests are checked against these types, and the OpenAPI document is
generated from them, so the two cannot drift. Bounds come from where a value
ends up: Raft carries it as msgpack (64-bit integers at most) and storage keeps
``priority`` and ``max_attempts`` in INTEGER columns, which on PostgreSQL are 32
bits. A value outside them used to be accepted here and then fail deep inside
the mesh (an unencodable Raft entry, a claim that could never succeed).
"""

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from raftmesh.consensus.model import EXECUTOR, VOTER
from raftmesh.mesh.errors import BadRequest
from raftmesh.mesh.scheduler import PLACEMENTS
from raftmesh.runner.context import BUDGET_KEYS
from raftmesh.runner.isolation import ISOLATION_MODES

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MAX = 2**63 - 1
# Deeper bodies are refused before anything recurses over them (JSON
# decoding, msgpack, the agent): a 400 instead of a RecursionError.
MAX_NESTING = 64
MAX_TIMEOUT_S = 1e9
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
}


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


class Failures(Struct):
    error: int
    timeout: int
    lost_owner: int


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


class RunList(Struct):
    runs: list[RunView]


class JoinResponse(Struct):
    id: str
    role: str
    voters: list[str]


T = TypeVar("T", bound=Struct)

_FIELD = re.compile(r"`\$\.(\w+)")
_MISSING = re.compile(r"missing required field `(\w+)`")


def parse_request(body: Any, kind: type[T], hints: dict[str, str] | None = None) -> T:
    """``body`` (decoded JSON) as a ``kind``, or BadRequest saying which field
    is wrong and what it must be. ``hints`` replace the message of a missing field."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    fields = msgspec.structs.fields(kind)
    unknown = set(body) - {f.name for f in fields}
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(_explain(str(exc), body, hints or {})) from None


def _explain(error: str, body: dict[str, Any], hints: dict[str, str]) -> str:
    missing = _MISSING.search(error)
    if missing:
        name = missing.group(1)
        return hints.get(name) or f"missing field '{name}': {RULES.get(name, 'required')}"
    field = _FIELD.search(error)
    if field and field.group(1) in RULES:
        name = field.group(1)
        got = repr(body.get(name))
        got = got if len(got) <= 80 else got[:77] + "..."
        return f"field '{name}' must be {RULES[name]}; got {got}"
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
