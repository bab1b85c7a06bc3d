"""What the API shows of a run: from the replicated state while it is active,
from storage once it has ended. One shape for both, so a client cannot tell
where the answer came from."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from raftmesh.consensus import waits
from raftmesh.consensus.model import Run
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.status import RunStatus
from raftmesh.mesh.scheduler import Said, Scheduler
from raftmesh.runner.payload import unpack
from raftmesh.storage.base import RunRow


def _s(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


# A children wait may name thousands of runs; a view shows the first ones.
VIEW_CHILDREN = 100


def active_view(
    state: MeshState, run: Run, scheduler: Scheduler, now_ms: int, said: Said | None = None
) -> dict[str, Any]:
    """An active run, with what keeps it from starting (queued) or what ends
    its suspension (waiting, paused). A list of views shares one ``said``
    (see ``Scheduler.waiting_for``)."""
    view = view_from_state(run)
    if run.status in (RunStatus.WAITING, RunStatus.PAUSED):
        view["waiting_for"] = suspension_message(run)
    else:
        waiting = scheduler.waiting_for(state, run, now_ms, said)
        view["waiting_for"] = None if waiting is None else waiting.message
    return view


def suspension_message(run: Run) -> str:
    """What a waiting or paused run waits for, said for an operator."""
    wait = run.waiting_for
    said = None if wait is None else _wait_message(wait)
    if run.status == RunStatus.PAUSED:
        return "an operator's resume" + (f" (paused while waiting for {said})" if said else "")
    return said or "its wake"


def _wait_message(wait: dict[str, Any]) -> str:
    due = wait.get("due_ms")
    until = "" if due is None else f" until {_iso(due)}"
    if wait.get("kind") == waits.SIGNAL:
        return f"signal {wait.get('signal')!r}" + (f" or a timeout{until}" if due else "")
    if wait.get("kind") == waits.CHILDREN:
        children = wait.get("children") or []
        return f"{len(children)} child run(s) to end: {', '.join(children[:3])}" + (
            ", ..." if len(children) > 3 else ""
        )
    return f"a timer{until}"


def wait_view(wait: dict[str, Any] | None) -> dict[str, Any] | None:
    """A suspended run's wait (consensus/waits.py) with times in seconds."""
    if wait is None:
        return None
    children = wait.get("children")
    return {
        "kind": wait.get("kind"),
        "due_at": _s(wait.get("due_ms")),
        "signal": wait.get("signal"),
        "children": None if children is None else children[:VIEW_CHILDREN],
        "children_total": None if children is None else len(children),
    }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def listed_status(run: Run) -> str:
    """The status a view shows: a settling run's outcome is decided; only its
    storage write is pending."""
    return run.outcome if run.status == RunStatus.SETTLING and run.outcome else run.status


def view_from_state(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "agent": run.spec.agent,
        "status": listed_status(run),
        "owner": run.owner,
        "epoch": run.epoch,
        "attempts": run.attempts,
        "result": None,
        "error": run.last_error,
        "cancel_requested": run.cancel_requested,
        "pause_requested": run.pause_requested,
        "wait": wait_view(run.waiting_for),
        "retry_at": _s(run.not_before_ms) if run.not_before_ms else None,
        # Counted apart: which of them use up max_attempts is the mesh's retry policy.
        "failures": {"error": run.errors, "timeout": run.timeouts, "lost_owner": run.losses},
        "session": run.spec.session,
        "tenant": run.spec.tenant,
        "priority": run.spec.priority,
        "labels": dict(run.spec.labels),
        "submitted_at": _s(run.submitted_at_ms),
        "started_at": _s(run.assigned_at_ms),
        "finished_at": None,
    }


def view_from_row(row: RunRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "agent": row.spec.agent,
        "status": row.status,
        "owner": row.owner,
        "epoch": row.epoch,
        "attempts": row.attempts,
        "result": unpack(row.result) if row.result is not None else None,
        "error": row.error,
        "tenant": row.spec.tenant,
        "priority": row.spec.priority,
        "labels": dict(row.spec.labels),
        "submitted_at": _s(row.submitted_at_ms),
        "started_at": _s(row.started_at_ms),
        "finished_at": _s(row.finished_at_ms),
    }
