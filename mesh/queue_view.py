"""What operators see of the queue and the slots: /v1/cluster and /metrics.

Pure: computed from one peer's copy of the replicated state and its clock, so
every peer answers alike (up to replication lag).
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any

from raftmesh.consensus.model import PEER_UP, Run
from raftmesh.consensus.state import MeshState
from raftmesh.consensus.status import RunStatus
from raftmesh.mesh.scheduler import Said, Scheduler
from raftmesh.mesh.views import suspension_message

SUSPENDED_LISTED = 50


def queue_summary(state: MeshState, scheduler: Scheduler, now_ms: int) -> dict[str, Any]:
    """Depth and oldest age overall and per tenant, and why runs wait. Waiting
    and paused runs are not queue depth (no slot would start them): they are
    counted and listed apart, under ``suspended``."""
    tenants: dict[str, dict[str, Any]] = {}
    waiting: Counter[str] = Counter()
    suspended: list[Run] = []
    depth = 0
    oldest: int | None = None
    said: Said = {}
    for run in state.runs.values():
        entry = tenants.setdefault(run.spec.tenant, {"queued": 0, "running": 0, "oldest_ms": None})
        if run.status == RunStatus.RUNNING:
            entry["running"] += 1
        if run.status in (RunStatus.WAITING, RunStatus.PAUSED):
            suspended.append(run)
        if run.status != RunStatus.QUEUED:
            continue
        depth += 1
        entry["queued"] += 1
        if entry["oldest_ms"] is None or run.submitted_at_ms < entry["oldest_ms"]:
            entry["oldest_ms"] = run.submitted_at_ms
        if oldest is None or run.submitted_at_ms < oldest:
            oldest = run.submitted_at_ms
        reason = scheduler.waiting_for(state, run, now_ms, said)
        if reason is not None:
            waiting[reason.message] += 1
    per_tenant = {
        tenant: {
            "queued": e["queued"],
            "running": e["running"],
            "oldest_age_s": _age_s(e["oldest_ms"], now_ms),
            "cap": state.tenant_cap(tenant),
            "max_queued": state.tenant_queue_limit(tenant),
        }
        for tenant, e in sorted(tenants.items())
    }
    return {
        "depth": depth,
        "oldest_age_s": _age_s(oldest, now_ms),
        "tenants": per_tenant,
        "waiting_for": dict(waiting.most_common()),
        "suspended": _suspended(suspended),
    }


def _suspended(runs: list[Run]) -> dict[str, Any]:
    """Counts of waiting and paused runs, and the oldest SUSPENDED_LISTED of
    them (a mesh may hold many thousands of waiting runs)."""
    counts = Counter(run.status for run in runs)
    oldest = heapq.nsmallest(SUSPENDED_LISTED, runs, key=lambda r: (r.submitted_at_ms, r.id))
    return {
        "waiting": counts[RunStatus.WAITING],
        "paused": counts[RunStatus.PAUSED],
        "runs": [
            {
                "id": run.id,
                "status": run.status,
                "tenant": run.spec.tenant,
                "agent": run.spec.agent,
                "waiting_for": suspension_message(run),
            }
            for run in oldest
        ],
    }


def slot_use(state: MeshState) -> dict[str, Any]:
    """Slots offered and used, and runs held ready beyond them (prefetch), per
    up peer and per label (key=value). A peer starts a held run as soon as a
    slot frees, so while it holds any, all its slots are in use."""
    peers = {}
    labels: dict[str, dict[str, int]] = {}
    for peer in sorted(state.peers.values(), key=lambda p: p.id):
        if peer.status != PEER_UP:
            continue
        owned = state.running_on(peer.id)
        used = min(owned, peer.slots)
        mine = peers[peer.id] = {"slots": peer.slots, "used": used, "held": owned - used}
        for key, value in peer.labels.items():
            entry = labels.setdefault(f"{key}={value}", dict.fromkeys(mine, 0))
            for field, count in mine.items():
                entry[field] += count
    return {"peers": peers, "labels": dict(sorted(labels.items()))}


def _age_s(since_ms: int | None, now_ms: int) -> float:
    return 0.0 if since_ms is None else max(0.0, (now_ms - since_ms) / 1000)
