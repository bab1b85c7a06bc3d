"""Placement: which queued run goes to which peer, decided by the leader.

Pure: reads a MeshState and returns a proposal. The state machine re-validates
every item on apply, so a plan made from a stale view is merely wasted, never
wrong.
"""

from __future__ import annotations

from consensus.state import PEER_UP, MeshState


def plan_assignments(state: MeshState, limit: int = 500) -> list[tuple[str, str, int]]:
    """Least-loaded placement over free slots, by priority then age, within
    tenant caps and slot labels."""
    free = {
        p.id: p.slots - state.running_on(p.id)
        for p in state.peers.values()
        if p.status == PEER_UP and p.slots - state.running_on(p.id) > 0
    }
    if not free:
        return []
    load = {peer_id: state.running_on(peer_id) for peer_id in free}
    tenant_running: dict[str, int] = {}
    plan: list[tuple[str, str, int]] = []
    for run in state.queued():
        if len(plan) >= limit or not free:
            break
        cap = state.tenant_cap(run.tenant)
        running = tenant_running.setdefault(run.tenant, state.running_for_tenant(run.tenant))
        if cap is not None and running >= cap:
            continue
        candidates = [
            peer_id
            for peer_id in free
            if all(state.peers[peer_id].labels.get(k) == v for k, v in run.labels.items())
            and state.peers[peer_id].can_run(run.agent)
        ]
        if not candidates:
            continue
        target = min(candidates, key=lambda pid: (load[pid] / max(1, state.peers[pid].slots), load[pid], pid))
        plan.append((run.id, target, run.epoch + 1))
        load[target] += 1
        free[target] -= 1
        if free[target] == 0:
            del free[target]
        tenant_running[run.tenant] = running + 1
    return plan
