"""Pass/warn/fail checks an operator reads first: is this mesh healthy, and if
not, where does it hurt?

Pure: every check is a function of plain values the service gathers
(``Vitals``), so ``mesh doctor`` or a test can compute the same verdicts from
the same numbers, and the thresholds live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PASS, WARN, FAIL = "pass", "warn", "fail"
_RANK = {PASS: 0, WARN: 1, FAIL: 2}

STORAGE_WARN_MS = 100.0
CHURN_WARN, CHURN_FAIL = 1, 3
SKEW_WARN_MS, SKEW_FAIL_MS = 250.0, 1000.0
DISK_WARN_FRACTION, DISK_FAIL_FRACTION = 0.15, 0.05
DISK_FAIL_BYTES = 256 * 1024 * 1024
RAFT_LOG_WARN_ENTRIES = 50_000
RAFT_FILES_WARN_BYTES = 512 * 1024 * 1024
RAFT_FILES_FAIL_BYTES = 2 * 1024 * 1024 * 1024


@dataclass(frozen=True)
class PeerVitals:
    id: str
    status: str
    since_ms: int
    # Seconds since the leader last heard it; None when this peer does not lead.
    heard_ago_s: float | None = None


@dataclass(frozen=True)
class Vitals:
    now_ms: int
    self_id: str
    leader: str | None
    term: int
    has_quorum: bool
    peer_ttl_s: float
    peers: list[PeerVitals]
    storage_latency_ms: float | None
    storage_error: str | None
    downs_recent: list[tuple[int, str]]
    oldest_queued_s: float
    queue_sla_s: float
    # Peer id -> its clock minus the leader's: every peer on the leader, this
    # one on a follower; None when not measured at all.
    clock_skews_ms: dict[str, float] | None
    disk_free_bytes: int
    disk_total_bytes: int
    raft_log_entries: int
    raft_files_bytes: int
    notes: list[str] = field(default_factory=list)


def check(name: str, status: str, detail: str, **values: Any) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail, **values}


def quorum(v: Vitals) -> dict[str, Any]:
    if v.leader is None:
        return check("quorum", FAIL, "no Raft leader is known: nothing can commit", term=v.term)
    if not v.has_quorum:
        return check("quorum", FAIL, f"{v.leader} leads but has no quorum", term=v.term)
    return check("quorum", PASS, f"{v.leader} leads term {v.term} with a quorum", term=v.term)


def liveness(v: Vitals) -> list[dict[str, Any]]:
    out = []
    for p in v.peers:
        name = f"liveness:{p.id}"
        if p.status == "left":
            continue
        if p.status == "down":
            down_s = max(0.0, (v.now_ms - p.since_ms) / 1000)
            out.append(check(name, FAIL, f"{p.id} is down (for {down_s:.0f} s)", peer=p.id))
        elif p.status != "up":
            out.append(check(name, WARN, f"{p.id} is {p.status}", peer=p.id))
        elif p.heard_ago_s is not None and p.heard_ago_s > v.peer_ttl_s / 2:
            out.append(
                check(
                    name,
                    WARN,
                    f"{p.id} is up but last reported {p.heard_ago_s:.1f} s ago "
                    f"(down after {v.peer_ttl_s:g} s)",
                    peer=p.id,
                )
            )
        else:
            out.append(check(name, PASS, f"{p.id} is up", peer=p.id))
    return out


def storage(v: Vitals) -> dict[str, Any]:
    if v.storage_error is not None:
        return check("storage", FAIL, f"storage unreachable: {v.storage_error}")
    if v.storage_latency_ms is None:
        return check("storage", WARN, "storage not probed yet")
    latency = round(v.storage_latency_ms, 1)
    if v.storage_latency_ms > STORAGE_WARN_MS:
        return check(
            "storage",
            WARN,
            f"storage answers slowly: {latency} ms (warn above {STORAGE_WARN_MS:g} ms)",
            latency_ms=latency,
        )
    return check("storage", PASS, f"storage answers in {latency} ms", latency_ms=latency)


def lease_churn(v: Vitals) -> dict[str, Any]:
    n = len(v.downs_recent)
    who = ", ".join(sorted({peer for _, peer in v.downs_recent}))
    detail = f"{n} peer(s) marked down in the last 10 min" + (f": {who}" if who else "")
    status = FAIL if n >= CHURN_FAIL else WARN if n >= CHURN_WARN else PASS
    return check("lease_churn", status, detail, count=n)


def queue_age(v: Vitals) -> dict[str, Any]:
    age = round(v.oldest_queued_s, 1)
    detail = f"oldest queued run waits {age} s (SLA {v.queue_sla_s:g} s)"
    status = FAIL if age > v.queue_sla_s else WARN if age > v.queue_sla_s / 2 else PASS
    return check("queue_age", status, detail, oldest_s=age, sla_s=v.queue_sla_s)


def clock_skew(v: Vitals) -> dict[str, Any] | None:
    if v.clock_skews_ms is None:
        return None
    if not v.clock_skews_ms:
        return check("clock_skew", WARN, "no recent heartbeats to compare clocks with")
    worst_peer, worst = max(v.clock_skews_ms.items(), key=lambda kv: abs(kv[1]))
    skew = round(worst, 1)
    detail = f"largest skew {skew} ms ({worst_peer} against the leader, {v.leader})"
    status = FAIL if abs(worst) > SKEW_FAIL_MS else WARN if abs(worst) > SKEW_WARN_MS else PASS
    return check("clock_skew", status, detail, skew_ms=skew, peer=worst_peer)


def disk(v: Vitals) -> dict[str, Any]:
    fraction = v.disk_free_bytes / v.disk_total_bytes if v.disk_total_bytes else 0.0
    mb = v.disk_free_bytes // (1024 * 1024)
    detail = f"data dir has {mb} MB free ({fraction:.0%})"
    if fraction < DISK_FAIL_FRACTION or v.disk_free_bytes < DISK_FAIL_BYTES:
        status = FAIL
    elif fraction < DISK_WARN_FRACTION:
        status = WARN
    else:
        status = PASS
    return check("disk", status, detail, free_bytes=v.disk_free_bytes)


def raft_size(v: Vitals) -> dict[str, Any]:
    mb = round(v.raft_files_bytes / (1024 * 1024), 1)
    detail = f"Raft log {v.raft_log_entries} entries, journal and snapshot {mb} MB"
    if v.raft_files_bytes > RAFT_FILES_FAIL_BYTES:
        status = FAIL
    elif v.raft_files_bytes > RAFT_FILES_WARN_BYTES or v.raft_log_entries > RAFT_LOG_WARN_ENTRIES:
        status = WARN
    else:
        status = PASS
    return check("raft_size", status, detail, entries=v.raft_log_entries, bytes=v.raft_files_bytes)


def diagnose(v: Vitals) -> dict[str, Any]:
    """Every check, and the worst status as the overall verdict."""
    checks = [quorum(v), *liveness(v), storage(v), lease_churn(v), queue_age(v)]
    skew = clock_skew(v)
    notes = list(v.notes)
    if skew is None:
        notes.append("clock skew not measured: no heartbeats to compare clocks with")
    else:
        checks.append(skew)
    checks += [disk(v), raft_size(v)]
    overall = max((c["status"] for c in checks), key=_RANK.__getitem__)
    return {"peer": v.self_id, "status": overall, "checks": checks, "notes": notes}
