"""When a schedule's ticks fall, and which of them the leader fires.

The calendar half of schedules (consensus/schedules.py holds the replicated
half): cron expressions are parsed by croniter in the schedule's time zone
(zoneinfo), periods are aligned to the Unix epoch. The leader asks
``ScheduleTicker.due`` on every tick for the ``FireTick`` commands to propose;
apply keeps each tick to one firing, so a deposed leader proposing the same
ticks as its successor does no harm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from raftmesh.consensus import commands
from raftmesh.consensus.schedules import (
    CATCHUP_ALL,
    CATCHUP_ONE,
    MAX_EVERY_MS,
    MIN_EVERY_MS,
    Schedule,
)
from raftmesh.consensus.state import MeshState
from raftmesh.mesh.proposer import new_id

log = logging.getLogger("raftmesh.schedules")

# Ticks one leader tick proposes per schedule under catchup "all": a long
# outage is caught up over several leader ticks, not in one huge entry.
MAX_TICKS_PER_ROUND = 100
# Under catchup "none" a tick fires if the leader gets to it within half its
# period, never less than this nor more than MAX_ON_TIME_MS late.
MIN_ON_TIME_MS = 1000
MAX_ON_TIME_MS = 60_000


class BadSchedule(ValueError):
    """A cron expression, period or time zone the mesh cannot tick by."""


@dataclass(frozen=True)
class When:
    """A schedule's timing as the state keeps it."""

    cron: str | None
    every_ms: int | None
    timezone: str


def parse_when(cron: str | None, every_s: float | None, timezone: str | None) -> When:
    """Check and normalise what the API was sent; raises BadSchedule."""
    if (cron is None) == (every_s is None):
        raise BadSchedule("give exactly one of 'cron' and 'every_s'")
    zone = timezone or "UTC"
    _zone(zone)
    if every_s is not None:
        if not math.isfinite(every_s) or not MIN_EVERY_MS <= every_s * 1000 <= MAX_EVERY_MS:
            raise BadSchedule(
                f"'every_s' must be from {MIN_EVERY_MS // 1000} to {MAX_EVERY_MS // 1000} seconds"
            )
        return When(None, round(every_s * 1000), zone)
    assert cron is not None
    expression = " ".join(cron.split())
    try:
        croniter(expression)
    except (CroniterError, ValueError, KeyError) as exc:
        raise BadSchedule(
            f"'cron' {cron!r} is not a cron expression: {exc} (5 fields, or 6 with "
            "seconds last, or 7 with the year last)"
        ) from None
    return When(expression, None, zone)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise BadSchedule(f"'timezone' {name!r} is not an IANA time zone: {exc}") from None


def next_tick(when: When, after_ms: int) -> int:
    """The first tick strictly after ``after_ms``."""
    if when.every_ms is not None:
        return (after_ms // when.every_ms + 1) * when.every_ms
    return _cron_ms(when, after_ms, forward=True)


def latest_tick(when: When, now_ms: int) -> int:
    """The last tick at or before ``now_ms``."""
    if when.every_ms is not None:
        return now_ms - now_ms % when.every_ms
    # croniter's get_prev is strict: start just past now to include now.
    return _cron_ms(when, now_ms + 1, forward=False)


def _cron_ms(when: When, start_ms: int, forward: bool) -> int:
    assert when.cron is not None
    start = datetime.fromtimestamp(start_ms / 1000, tz=_zone(when.timezone))
    it = croniter(when.cron, start)
    return round((it.get_next(float) if forward else it.get_prev(float)) * 1000)


def on_time_ms(when: When, tick_ms: int) -> int:
    """How late a tick may fire under catchup "none"."""
    period = next_tick(when, tick_ms) - tick_ms
    return min(MAX_ON_TIME_MS, max(MIN_ON_TIME_MS, period // 2))


def plan_ticks(schedule: Schedule, now_ms: int) -> list[tuple[int, bool]]:
    """The ticks due at ``now_ms``, each with whether it fires (False: it is
    dropped, advancing the schedule past it), by the catch-up policy:
    - all: every tick since the last, in order (MAX_TICKS_PER_ROUND at a time);
    - one: only the latest due tick fires, those before it are passed over;
    - none: the latest due tick fires if it is on time (``on_time_ms``), else
      it is dropped too.
    Raises BadSchedule for a timing this peer cannot compute."""
    when = When(schedule.cron, schedule.every_ms, schedule.timezone)
    first = next_tick(when, schedule.last_tick_ms)
    if first > now_ms:
        return []
    if schedule.catchup == CATCHUP_ALL:
        ticks = [first]
        while len(ticks) < MAX_TICKS_PER_ROUND:
            after = next_tick(when, ticks[-1])
            if after > now_ms:
                break
            ticks.append(after)
        return [(t, True) for t in ticks]
    latest = latest_tick(when, now_ms)
    if schedule.catchup == CATCHUP_ONE:
        return [(latest, True)]
    return [(latest, now_ms - latest <= on_time_ms(when, latest))]


class ScheduleTicker:
    """The leader's view of when each schedule is next due: computed once per
    change of the schedule, so a leader tick with nothing due costs a dict
    lookup per schedule. A cache only: a new leader builds it from the state."""

    def __init__(self) -> None:
        self._next: dict[str, tuple[tuple[object, ...], int | None]] = {}

    def due(self, state: MeshState, now_ms: int) -> list[commands.Command]:
        out: list[commands.Command] = []
        for schedule in state.schedules.values():
            if schedule.paused:
                continue
            version = (
                schedule.last_tick_ms,
                schedule.cron,
                schedule.every_ms,
                schedule.timezone,
                schedule.catchup,
            )
            cached = self._next.get(schedule.id)
            if cached is None or cached[0] != version:
                cached = (version, self._first_due(schedule))
                self._next[schedule.id] = cached
            if cached[1] is None or cached[1] > now_ms:
                continue
            try:
                ticks = plan_ticks(schedule, now_ms)
            except (BadSchedule, CroniterError, ValueError) as exc:
                log.warning("schedule %s cannot be ticked here: %s", schedule.id, exc)
                continue
            out.extend(
                commands.FireTick(new_id(), now_ms, schedule.id, tick, fire) for tick, fire in ticks
            )
        for gone in self._next.keys() - state.schedules.keys():
            del self._next[gone]
        return out

    @staticmethod
    def _first_due(schedule: Schedule) -> int | None:
        when = When(schedule.cron, schedule.every_ms, schedule.timezone)
        try:
            return next_tick(when, schedule.last_tick_ms)
        except (BadSchedule, CroniterError, ValueError) as exc:
            log.warning("schedule %s cannot be ticked here: %s", schedule.id, exc)
            return None
