"""Replicated schedules: what one is, and the rules apply judges its commands by.

A schedule is data in the replicated state, so every peer knows it and any
leader can fire it. What a tick *is* (the next time a cron expression or a
period names) needs a clock and a calendar, so the leader works that out
(mesh/schedules.py) and proposes ``FireTick(schedule, tick_ms)``; apply only
checks that the tick is after the schedule's last one. Ticks therefore move
forward only, and a tick proposed twice (by one leader retrying, or by a
deposed leader and its successor) fires once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

OVERLAP_SKIP = "skip"
OVERLAP_ALLOW = "allow"
OVERLAP_CANCEL_PREVIOUS = "cancel_previous"
OVERLAPS = frozenset({OVERLAP_SKIP, OVERLAP_ALLOW, OVERLAP_CANCEL_PREVIOUS})

CATCHUP_NONE = "none"
CATCHUP_ONE = "one"
CATCHUP_ALL = "all"
CATCHUPS = frozenset({CATCHUP_NONE, CATCHUP_ONE, CATCHUP_ALL})

# The API's rule for ids (mesh/schemas.ScheduleRequest): safe in a URL path
# and in an idempotency key. Matched whole (``$`` would let a newline end it).
SCHEDULE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MIN_EVERY_MS = 1000
MAX_EVERY_MS = 366 * 24 * 3600 * 1000


def tick_key(schedule_id: str, tick_ms: int) -> str:
    """The idempotency key of the run a tick starts: one tick, one run."""
    return f"schedule:{schedule_id}:{tick_ms}"


def tick_run_id(schedule_id: str, tick_ms: int) -> str:
    """The id of the run a tick starts, the same on every replica (apply
    cannot draw a random one) and shaped like the ids the API hands out."""
    return hashlib.sha256(tick_key(schedule_id, tick_ms).encode()).hexdigest()[:32]


@dataclass
class Schedule:
    """``cron`` or ``every_ms`` (exactly one) says when; ``agent``, ``input``
    and ``tenant`` what each tick runs. ``last_tick_ms`` is the latest tick
    fired or skipped (its creation time before the first), so the next tick
    due is the first one after it."""

    id: str
    cron: str | None
    every_ms: int | None
    timezone: str
    agent: str
    input: Any
    tenant: str
    overlap: str
    catchup: str
    created_at_ms: int
    last_tick_ms: int
    paused: bool = False
    # The run the latest fired tick started (overlap looks at it).
    last_run: str | None = None
    fired: int = 0
    skipped: int = 0

    def definition(self) -> tuple[Any, ...]:
        """What the schedule was asked to be; setting the same again is a no-op."""
        return (
            self.cron,
            self.every_ms,
            self.timezone,
            self.agent,
            self.input,
            self.tenant,
            self.overlap,
            self.catchup,
        )

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_public(cls, data: dict[str, Any]) -> Schedule:
        return cls(**data)


class ScheduleInvalid(ValueError):
    """A schedule definition apply refuses; the message names the field."""


def check_definition(
    schedule_id: Any,
    cron: Any,
    every_ms: Any,
    timezone: Any,
    agent: Any,
    tenant: Any,
    overlap: Any,
    catchup: Any,
) -> None:
    """The shape apply can judge without a calendar: the API has already
    parsed the cron expression and the time zone; here only their types are
    checked, so a replica never depends on its croniter or tzdata version."""
    if not isinstance(schedule_id, str) or not SCHEDULE_ID.fullmatch(schedule_id):
        raise ScheduleInvalid("schedule id must be 1 to 128 characters of [A-Za-z0-9_.:-]")
    if (cron is None) == (every_ms is None):
        raise ScheduleInvalid("a schedule needs exactly one of cron and every_s")
    if cron is not None and (not isinstance(cron, str) or not cron.strip()):
        raise ScheduleInvalid("cron must be a non-empty expression")
    if every_ms is not None and (
        isinstance(every_ms, bool)
        or not isinstance(every_ms, int)
        or not MIN_EVERY_MS <= every_ms <= MAX_EVERY_MS
    ):
        raise ScheduleInvalid(
            f"every_ms must be an integer from {MIN_EVERY_MS} to {MAX_EVERY_MS} ms"
        )
    for name, value in (("timezone", timezone), ("agent", agent), ("tenant", tenant)):
        if not isinstance(value, str) or not value or "\x00" in value:
            raise ScheduleInvalid(f"{name} must be non-empty text")
    if overlap not in OVERLAPS:
        raise ScheduleInvalid(f"overlap must be one of {sorted(OVERLAPS)}")
    if catchup not in CATCHUPS:
        raise ScheduleInvalid(f"catchup must be one of {sorted(CATCHUPS)}")
