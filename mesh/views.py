"""What the API shows of a run: from the replicated state while it is active,
from storage once it has ended. One shape for both, so a client cannot tell
where the answer came from."""

from __future__ import annotations

from typing import Any

from raftmesh.consensus.model import Run
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.status import RunStatus
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.runner.payload import unpack
from raftmesh.storage.base import RunRow


def _s(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


def active_view(state: MeshState, run: Run, scheduler: Scheduler, now_ms: int) -> dict[str, Any]:
    """An active run, with what keeps it from starting if it is waiting."""
    view = view_from_state(run)
    waiting = scheduler.waiting_for(state, run, now_ms)
    view["waiting_for"] = None if waiting is None else waiting.message
    return view


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
