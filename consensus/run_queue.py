"""The queued runs, kept in scheduling order as they enter and leave the queue.

The leader plans on every applied entry, and under load the queue holds
thousands of runs while only a few slots are free. Sorting the whole queue on
each plan was the largest cost of a loaded leader (a third of its event loop,
with the Raft thread waiting on the state lock meanwhile); kept in order here,
a plan reads just the runs it can place.

Order: higher priority first, then older (``submitted_at_ms``), then id. Each
priority level is a FIFO of its own, so an order that ages runs (priority plus
waited time) is a merge of the levels' heads: within one level an older run
never ranks below a younger one. The aged order is written once, here: the
leader plans with it and apply hands a freed slot on with it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from sortedcontainers import SortedList

from raftmesh.consensus.model import Run

_Key = tuple[int, str]  # (submitted_at_ms, run id) within one priority level


class RunQueue:
    """Derived from the runs (never replicated or snapshotted itself): the
    state adds a run when it becomes queued and discards it when it stops
    being queued."""

    def __init__(self) -> None:
        self._levels: dict[int, SortedList] = {}
        self._runs: dict[str, tuple[int, _Key, Run]] = {}

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    def add(self, run: Run) -> None:
        if run.id in self._runs:
            return
        priority, key = run.spec.priority, (run.submitted_at_ms, run.id)
        self._runs[run.id] = (priority, key, run)
        self._levels.setdefault(priority, SortedList()).add(key)

    def discard(self, run: Run) -> None:
        # The key it was filed under, not one read from the run now.
        entry = self._runs.pop(run.id, None)
        if entry is None:
            return
        priority, key, _ = entry
        level = self._levels[priority]
        level.remove(key)
        if not level:
            del self._levels[priority]

    def levels(self) -> list[Iterator[Run]]:
        """Each priority level's runs, oldest first, highest level first.
        Lazy: a reader that stops early pays only for what it read."""
        return [self._level(p) for p in sorted(self._levels, reverse=True)]

    def ordered(self, now_ms: int, aging_ms: int) -> Iterator[Run]:
        """Queued runs in scheduling order at ``now_ms``: higher aged priority
        first, FIFO within one; ``aging_ms`` of waiting earns one priority
        level (0: no aging). Lazy, as ``levels``."""
        levels = self.levels()
        if aging_ms <= 0:
            return itertools.chain.from_iterable(levels)
        return heapq.merge(
            *levels,
            key=lambda r: (-aged_priority(r, now_ms, aging_ms), r.submitted_at_ms, r.id),
        )

    def __iter__(self) -> Iterator[Run]:
        """Every queued run in scheduling order."""
        for runs in self.levels():
            yield from runs

    def _level(self, priority: int) -> Iterator[Run]:
        for _, run_id in self._levels.get(priority, ()):
            yield self._runs[run_id][2]


def aged_priority(run: Run, now_ms: int, aging_ms: int) -> int:
    """The run's priority plus one level per ``aging_ms`` it has waited."""
    if aging_ms <= 0:
        return run.spec.priority
    return run.spec.priority + max(0, now_ms - run.submitted_at_ms) // aging_ms
