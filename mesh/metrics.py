"""Prometheus metrics of one peer (its own registry, so tests can run many)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.submissions = Counter(
            "raftmesh_submissions_total", "Runs accepted by this peer", ["outcome"], registry=r
        )
        self.commit_seconds = Histogram(
            "raftmesh_commit_seconds",
            "Time for a submission to commit through Raft",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.attempts = Counter(
            "raftmesh_attempts_total", "Attempts finished on this peer", ["outcome"], registry=r
        )
        self.running = Gauge("raftmesh_running_runs", "Runs executing on this peer", registry=r)
        self.slots = Gauge("raftmesh_slots", "Slots this peer offers", registry=r)
        self.queue_depth = Gauge("raftmesh_queue_depth", "Queued runs in the mesh", registry=r)
        # Suspended runs hold no slot and are not queue depth (DESIGN.md).
        self.waiting_runs = Gauge(
            "raftmesh_waiting_runs", "Runs waiting on a timer, a signal or children", registry=r
        )
        self.paused_runs = Gauge("raftmesh_paused_runs", "Runs an operator paused", registry=r)
        self.queue_oldest_age = Gauge(
            "raftmesh_queue_oldest_age_seconds", "Age of the oldest queued run", registry=r
        )
        self.tenant_queue_depth = Gauge(
            "raftmesh_tenant_queue_depth", "Queued runs per tenant", ["tenant"], registry=r
        )
        self.tenant_queue_oldest_age = Gauge(
            "raftmesh_tenant_queue_oldest_age_seconds",
            "Age of the tenant's oldest queued run",
            ["tenant"],
            registry=r,
        )
        self.tenant_running = Gauge(
            "raftmesh_tenant_running_runs", "Running runs per tenant", ["tenant"], registry=r
        )
        self.mesh_slots = Gauge(
            "raftmesh_mesh_slots", "Slots offered by each up peer", ["peer"], registry=r
        )
        self.mesh_slots_used = Gauge(
            "raftmesh_mesh_slots_used", "Slots in use on each up peer", ["peer"], registry=r
        )
        self.mesh_runs_held = Gauge(
            "raftmesh_mesh_runs_held",
            "Runs each up peer holds ready beyond its slots (prefetch)",
            ["peer"],
            registry=r,
        )
        self.label_slots = Gauge(
            "raftmesh_label_slots", "Slots offered by up peers with a label", ["label"], registry=r
        )
        self.label_slots_used = Gauge(
            "raftmesh_label_slots_used",
            "Slots in use on up peers with a label",
            ["label"],
            registry=r,
        )
        self.is_leader = Gauge("raftmesh_is_leader", "1 if this peer leads", registry=r)
        self.term = Gauge("raftmesh_raft_term", "Current Raft term", registry=r)
        self.peers_down = Counter(
            "raftmesh_peers_marked_down_total",
            "peer_down proposals committed by this leader",
            registry=r,
        )
        self.self_fenced = Counter(
            "raftmesh_self_fenced_attempts_total",
            "Attempts this peer stopped itself after losing contact with the leader",
            registry=r,
        )
        self.handoffs = Counter(
            "raftmesh_slot_handoffs_total",
            "Runs started, mesh-wide, in the slot a finish freed, in the finish's own commit"
            " (no leader tick or assign in between)",
            registry=r,
        )
        self.journal_syncs = Gauge(
            "raftmesh_journal_syncs", "Raft journal fsyncs since start", registry=r
        )

        # What explains load (issue 13): no run ids in labels, so the series
        # stay bounded by statuses, peers and tenants.
        self.runs = Gauge(
            "raftmesh_runs", "Active runs in the replicated state by status", ["status"], registry=r
        )
        self.runs_finished = Counter(
            "raftmesh_runs_finished_total",
            "Outcomes this peer wrote to storage (its own attempts, and, leading, the mesh's decisions)",
            ["status"],
            registry=r,
        )
        self.peers = Gauge(
            "raftmesh_peers", "Peers of the membership by status", ["status"], registry=r
        )
        self.has_leader = Gauge(
            "raftmesh_has_leader", "1 if this peer knows a Raft leader", registry=r
        )
        self.assignment_latency = Histogram(
            "raftmesh_assignment_latency_seconds",
            "From submission to the first owner's storage claim (first attempts only; "
            "a re-queued run is in raftmesh_failover_duration_seconds)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.run_duration = Histogram(
            "raftmesh_run_duration_seconds",
            "From a run's first start to the outcome this peer wrote",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "raftmesh_step_duration_seconds",
            "From the previous step boundary (or the claim) to a step's checkpoint",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.checkpoint_write = Histogram(
            "raftmesh_checkpoint_write_seconds",
            "Time to write one step checkpoint to storage",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rate_limit_wait = Histogram(
            "raftmesh_rate_limit_wait_seconds",
            "Time a call waited for capacity of a mesh-wide rate limit (ctx.limit)",
            ["limit"],
            buckets=(0, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.failover_duration = Histogram(
            "raftmesh_failover_duration_seconds",
            "From the last report of a peer judged down to its run's reassignment (leader)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.failovers = Counter(
            "raftmesh_failovers_total",
            "Runs re-queued because their owner was judged down (leader)",
            registry=r,
        )
        self.leader_changes = Counter(
            "raftmesh_leader_changes_total", "Leader changes this peer observed", registry=r
        )
        self.raft_commit_seconds = Histogram(
            "raftmesh_raft_commit_seconds",
            "Time for any command this peer proposed to commit",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.raft_journal_sync = Histogram(
            "raftmesh_raft_journal_sync_seconds",
            "Raft journal fdatasyncs: every commit waits for one on a majority",
            buckets=_PAUSE_BUCKETS,
            registry=r,
        )
        self.raft_commit_index = Gauge(
            "raftmesh_raft_commit_index", "Highest Raft log index known committed", registry=r
        )
        self.raft_apply_lag = Gauge(
            "raftmesh_raft_apply_lag_entries", "Committed entries not yet applied here", registry=r
        )
        self.raft_log_entries = Gauge(
            "raftmesh_raft_log_entries", "Entries in this peer's Raft log", registry=r
        )
        self.storage_pool_in_use = Gauge(
            "raftmesh_storage_pool_connections_in_use",
            "Storage pool connections checked out (PostgreSQL)",
            registry=r,
        )
        self.storage_pool_size = Gauge(
            "raftmesh_storage_pool_connections", "Storage pool connections open", registry=r
        )
        self.storage_ping = Histogram(
            "raftmesh_storage_ping_seconds",
            "Round trip of a trivial storage query, probed every few seconds",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "raftmesh_gc_pause_seconds",
            "Pauses of Python's garbage collector (they stop every thread)",
            ["generation"],
            buckets=_PAUSE_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "raftmesh_event_loop_lag_seconds",
            "How late the event loop ran a timer that was due",
            buckets=_PAUSE_BUCKETS,
            registry=r,
        )

    def set_queue(self, queue: dict[str, Any], slots: dict[str, Any]) -> None:
        """Refresh the mesh-wide gauges from queue_view; tenants and peers
        that disappeared drop out instead of keeping stale values."""
        self.queue_depth.set(queue["depth"])
        self.queue_oldest_age.set(queue["oldest_age_s"])
        self.waiting_runs.set(queue["suspended"]["waiting"])
        self.paused_runs.set(queue["suspended"]["paused"])
        for gauge in (
            self.tenant_queue_depth,
            self.tenant_queue_oldest_age,
            self.tenant_running,
            self.mesh_slots,
            self.mesh_slots_used,
            self.mesh_runs_held,
            self.label_slots,
            self.label_slots_used,
        ):
            gauge.clear()
        for tenant, entry in queue["tenants"].items():
            self.tenant_queue_depth.labels(tenant).set(entry["queued"])
            self.tenant_queue_oldest_age.labels(tenant).set(entry["oldest_age_s"])
            self.tenant_running.labels(tenant).set(entry["running"])
        for peer, entry in slots["peers"].items():
            self.mesh_slots.labels(peer).set(entry["slots"])
            self.mesh_slots_used.labels(peer).set(entry["used"])
            self.mesh_runs_held.labels(peer).set(entry["held"])
        for label, entry in slots["labels"].items():
            self.label_slots.labels(label).set(entry["slots"])
            self.label_slots_used.labels(label).set(entry["used"])
