"""When is a waiting run's wait over? The one rule, in one place.

apply re-checks it for every run a ``wake`` names and the leader proposes
``wake`` with it, so a wake from a stale view is harmless and a run is never
woken before its wait is over. Pure: the clock is the ``at_ms`` handed in.

A wait is a plain map (it lives in snapshots as ``Run.waiting_for``):
``{"kind": "timer"|"signal"|"children", "due_ms": int|None, "signal": str|None,
"index": int|None, "children": list[str]|None}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

from raftmesh.consensus.model import Run
from raftmesh.consensus.status import RunStatus

TIMER = "timer"
SIGNAL = "signal"
CHILDREN = "children"
WAIT_KINDS = frozenset({TIMER, SIGNAL, CHILDREN})
WAIT_KEYS = ("kind", "due_ms", "signal", "index", "children")

SIGNAL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# ctx.spawn bounds a run's children far below this; the bound keeps one
# suspend from bloating every snapshot.
MAX_WAIT_CHILDREN = 10_000
# state.MAX_MS, the clock readings apply accepts (state imports this module).
MAX_MS = 2**53


class InvalidWait(ValueError):
    """A wait map that is not one of the three kinds, well-formed."""


class Runs(Protocol):
    """What the rule reads of the state: which runs are still active."""

    @property
    def runs(self) -> Mapping[str, Run]: ...


def valid_signal_name(name: Any) -> bool:
    return isinstance(name, str) and SIGNAL_NAME.fullmatch(name) is not None


def checked_wait(value: Any) -> dict[str, Any]:
    """``value`` as a wait with all five keys, or InvalidWait saying why."""
    if not isinstance(value, dict):
        raise InvalidWait("a wait is a map")
    unknown = set(value) - set(WAIT_KEYS)
    if unknown:
        raise InvalidWait(f"a wait has no keys {sorted(map(str, unknown))}")
    wait = {key: value.get(key) for key in WAIT_KEYS}
    kind, due_ms, signal, index, children = (wait[k] for k in WAIT_KEYS)
    if not isinstance(kind, str) or kind not in WAIT_KINDS:
        raise InvalidWait(f"a wait's kind is one of {sorted(WAIT_KINDS)}, not {kind!r}")
    if due_ms is not None and not _count(due_ms, MAX_MS):
        raise InvalidWait(f"due_ms must be a clock reading in ms, not {due_ms!r}")
    if kind == TIMER and (due_ms is None or (signal, index, children) != (None, None, None)):
        raise InvalidWait("a timer wait has a due_ms and nothing else")
    if kind == SIGNAL and (
        not valid_signal_name(signal) or not _count(index, 2**63 - 1) or children is not None
    ):
        raise InvalidWait("a signal wait names a signal (1-128 of A-Za-z0-9_.:-) and an index")
    if kind == CHILDREN:
        if (due_ms, signal, index) != (None, None, None) or not isinstance(children, list):
            raise InvalidWait("a children wait has a list of children and nothing else")
        if not 0 < len(children) <= MAX_WAIT_CHILDREN or not all(
            isinstance(child, str) for child in children
        ):
            raise InvalidWait(f"a children wait lists 1 to {MAX_WAIT_CHILDREN} run ids")
        wait["children"] = list(children)
    return wait


def wait_satisfied(run: Run, state: Runs, at_ms: int) -> bool:
    """Whether ``run`` is WAITING and its wait is over at ``at_ms``."""
    wait = run.waiting_for
    if run.status != RunStatus.WAITING or wait is None:
        return False
    due_ms = wait.get("due_ms")
    timed_out = due_ms is not None and at_ms >= due_ms
    kind = wait.get("kind")
    if kind == TIMER:
        return timed_out
    if kind == SIGNAL:
        return timed_out or run.signals.get(wait["signal"], 0) > wait["index"]
    if kind == CHILDREN:
        return not any(child in state.runs for child in wait["children"])
    return False


def due_ms(run: Run) -> int | None:
    """When a WAITING run's wait ends by the clock alone, if it does: the
    leader sets a timer for the earliest."""
    if run.status != RunStatus.WAITING or run.waiting_for is None:
        return None
    due = run.waiting_for.get("due_ms")
    return due if isinstance(due, int) else None


def _count(value: Any, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high
