"""What a run is asked to be: the one declaration of a run's fields.

Every layer carries a ``RunSpec`` rather than its own copy of the list: the
submit command and the replicated ``Run``, the assignment a peer runs, and the
storage row a retry is rebuilt from. A field added here travels everywhere, so
a re-queued dead letter can no longer come back without its isolation or its
memory limit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

INT64_MAX = 2**63 - 1
# Placements (``RunSpec.placement``, or the leader's default): how the leader
# chooses among the peers a run may go to.
LEAST_LOADED = "least-loaded"
ROUND_ROBIN = "round-robin"
CONSISTENT_HASH = "consistent-hash"
PLACEMENTS = (LEAST_LOADED, ROUND_ROBIN, CONSISTENT_HASH)
MAX_TIMEOUT_S = 1e9
# W3C trace context, version 00 (what the OpenTelemetry propagator writes).
_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class SpecError(ValueError):
    """A wire value that is not a run spec; the message names the field."""


@dataclass(frozen=True)
class RunSpec:
    agent: str
    # The agent's input: any msgpack value. Storage holds it packed (bytes).
    input: Any = None
    tenant: str = "default"
    priority: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    max_attempts: int = 1
    idempotency_key: str | None = None
    parent_id: str | None = None
    depth: int = 0
    budget: Mapping[str, int] | None = None
    isolation: str = "task"
    memory_limit_mb: int | None = None
    session: str | None = None
    placement: str | None = None
    # The W3C traceparent of the span that submitted the run: every peer that
    # assigns or runs it traces under it, so one trace survives a failover.
    trace_parent: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """Plain values only (msgpack and JSON safe)."""
        wire = dict(vars(self))  # the fields, as dataclasses.fields() names them, faster
        wire["labels"] = dict(self.labels)
        if self.budget is not None:
            wire["budget"] = dict(self.budget)
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> RunSpec:
        """The inverse of ``to_wire``, checking every value (a wire value may
        come from an older or a hostile proposer); absent and null fields take
        their defaults. Raises SpecError."""
        if not isinstance(data, Mapping):
            raise SpecError("run spec is not a map")
        unknown = set(data) - _FIELD_NAMES
        if unknown:
            raise SpecError(f"run spec has unknown fields {sorted(map(str, unknown))}")
        values = {k: v for k, v in data.items() if v is not None}
        for name, check in _CHECKS.items():
            if name in values and not check(values[name]):
                raise SpecError(f"run spec field {name} is out of range or of the wrong type")
        if "agent" not in values:
            raise SpecError("run spec lacks an agent")
        if "labels" in values:
            values["labels"] = dict(values["labels"])
        if "budget" in values:
            values["budget"] = dict(values["budget"])
        if "timeout_s" in values:
            values["timeout_s"] = float(values["timeout_s"])
        return cls(**values)


def _int(lo: int, hi: int = INT64_MAX) -> Any:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _text(v: Any) -> bool:
    """Text every backend can store: UTF-8 (no lone surrogates), and no NUL,
    which PostgreSQL text cannot hold."""
    if not isinstance(v, str) or "\x00" in v:
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _str_map(v: Any) -> bool:
    return isinstance(v, Mapping) and all(_text(k) and _text(x) for k, x in v.items())


def _budget(v: Any) -> bool:
    return isinstance(v, Mapping) and all(isinstance(k, str) and _int(0)(x) for k, x in v.items())


def _timeout(v: Any) -> bool:
    return (
        isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and 0 < v <= MAX_TIMEOUT_S
    )


_CHECKS = {
    "agent": lambda v: _text(v) and v != "",
    "tenant": lambda v: _text(v) and v != "",
    "priority": _int(-INT64_MAX),
    "labels": _str_map,
    "timeout_s": _timeout,
    "max_attempts": _int(1),
    "idempotency_key": _text,
    "parent_id": _text,
    "depth": _int(0),
    "budget": _budget,
    "isolation": _text,
    "memory_limit_mb": _int(1),
    "session": _text,
    "placement": _text,
    "trace_parent": lambda v: isinstance(v, str) and _TRACEPARENT.match(v) is not None,
}
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec))
_FIELD_NAMES = frozenset(SPEC_FIELDS)
