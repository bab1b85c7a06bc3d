"""The replicated run-ownership state machine.

Pure and deterministic: no I/O, no clock, no randomness. Every peer applies the
same commands in the same order and must reach the same state, so ``apply``
never raises (pysyncobj retries a raising apply forever) and never trusts a
proposal: an ``assign`` from a deposed leader or from a stale view is
re-validated here and rejected item by item.

Only active runs live here. A finished run is evicted as soon as its ``finish``
applies (its outcome is already durable in storage); idempotency keys and
command ids are remembered for a TTL so retries stay harmless without the state
growing with history.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from raftmesh.consensus import commands as c
from raftmesh.consensus.spec import SPEC_FIELDS, RunSpec

QUEUED = "queued"
RUNNING = "running"
# A terminal outcome decided by the mesh (cancelled while queued, retries
# exhausted, owner lost too often): the run waits here until the leader has
# written the outcome to storage and proposed ``settle``, so it is never
# dropped from Raft before storage knows how it ended.
SETTLING = "settling"
FINISH_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
FAILURE_KINDS = frozenset({"error", "timeout"})

PEER_UP = "up"
PEER_DOWN = "down"
# Reserved by a join, not announced by a process yet.
PEER_JOINING = "joining"
# Removed from the mesh for good; its id may join again.
PEER_LEFT = "left"

VOTER = "voter"
EXECUTOR = "executor"
ROLES = frozenset({VOTER, EXECUTOR})

# Drain modes: runs already there finish there, or are released at their next
# step boundary and run elsewhere.
DRAIN_FINISH = "finish"
DRAIN_RELEASE = "release"
DRAIN_MODES = frozenset({"", DRAIN_FINISH, DRAIN_RELEASE})

IDEMPOTENCY_TTL_MS = 24 * 3600 * 1000
COMMAND_TTL_MS = 10 * 60 * 1000


@dataclass
class Run:
    id: str
    agent: str
    input: Any
    tenant: str = "default"
    priority: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    max_attempts: int = 1
    idempotency_key: str | None = None
    parent_id: str | None = None
    submitted_at_ms: int = 0
    depth: int = 0
    budget: dict[str, int] | None = None
    isolation: str = "task"
    memory_limit_mb: int | None = None
    status: str = QUEUED
    owner: str | None = None
    epoch: int = 0
    attempts: int = 0
    assigned_at_ms: int | None = None
    session: str | None = None
    placement: str | None = None
    not_before_ms: int = 0
    errors: int = 0
    timeouts: int = 0
    losses: int = 0
    last_error: str | None = None
    cancel_requested: bool = False
    outcome: str | None = None

    def spec(self) -> RunSpec:
        """What the run was submitted as (every field a retry needs)."""
        return RunSpec(**{name: getattr(self, name) for name in SPEC_FIELDS})

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Peer:
    id: str
    incarnation: str
    raft: str
    http: str
    slots: int
    labels: dict[str, str] = field(default_factory=dict)
    status: str = PEER_UP
    since_ms: int = 0
    agents: list[str] | None = None
    role: str = VOTER
    # Operator intent, kept across restarts of the peer: "" or a drain mode.
    drain: str = ""
    # This incarnation is shutting down (SIGTERM): it gets nothing new.
    stopping: bool = False

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def schedulable(self) -> bool:
        return self.status == PEER_UP and not self.drain and not self.stopping

    def can_run(self, agent: str) -> bool:
        """Peers that announced no agent list (older peers) are assumed to run any."""
        return self.agents is None or agent in self.agents


def _agent_list(agents: Any) -> list[str] | None:
    if agents is None:
        return None
    if not isinstance(agents, list) or not all(isinstance(a, str) for a in agents):
        raise Rejected("agents must be a list of names")
    return sorted(agents)


class Rejected(Exception):
    """Internal control flow: a command (or one item of a batch) is refused."""

    code = "rejected"


class QueueFull(Rejected):
    """The tenant's queued-run maximum is reached: backpressure, not an error."""

    code = "tenant_queue_full"


_RUN_FIELDS = {
    "id": str,
    "agent": str,
    "tenant": str,
    "priority": int,
    "max_attempts": int,
    "epoch": int,
    "attempts": int,
}
_OPTIONAL_TEXT = ("session", "placement")


@dataclass
class RetryPolicy:
    """Which failed attempts are retried, and how long to back off.

    Lost owners are always requeued (that is failover, not a retry); they
    consume an attempt only when ``count_lost_owner`` is set.
    """

    backoff_base_ms: int = 1000
    backoff_max_ms: int = 60_000
    retry_timeouts: bool = True
    count_lost_owner: bool = False

    def used(self, run: Run) -> int:
        return run.errors + run.timeouts + (run.losses if self.count_lost_owner else 0)


def backoff_ms(run_id: str, failures: int, base_ms: int, max_ms: int) -> int:
    """Exponential backoff with "equal jitter", deterministic for every replica:
    the jitter is a hash of the run id and the failure count, not randomness."""
    ceiling = min(max_ms, base_ms * 2 ** max(0, min(failures - 1, 40)))
    digest = hashlib.blake2b(f"{run_id}:{failures}".encode(), digest_size=8).digest()
    fraction = int.from_bytes(digest, "big") / 2**64
    return ceiling // 2 + int(fraction * (ceiling - ceiling // 2))


class MeshState:
    """The whole replicated state; mutated only through ``apply``."""

    def __init__(self) -> None:
        self.runs: dict[str, Run] = {}
        self.peers: dict[str, Peer] = {}
        self.by_owner: dict[str, set[str]] = {}
        self.tenant_running: dict[str, int] = {}
        self.tenant_queued: dict[str, int] = {}
        # (tenant, idempotency key) -> (run id, expiry): one tenant's key never
        # finds another tenant's run.
        self.idempotency: dict[tuple[str, str], tuple[str, int]] = {}
        self.seen: dict[str, tuple[Any, int]] = {}
        self.tenant_caps: dict[str, int] = {}
        self.default_tenant_cap: int | None = None
        self.tenant_max_queued: dict[str, int] = {}
        self.default_tenant_max_queued: int | None = None
        self.retry = RetryPolicy()
        self.applied = 0

    # -- applying ---------------------------------------------------------

    def apply(self, command: Any) -> dict[str, Any]:
        """Apply one command; return its result. Never raises."""
        self.applied += 1
        if not isinstance(command, dict):
            return {"ok": False, "error": "command is not a map"}
        cid = command.get("cid")
        at_ms = command.get("at_ms")
        if not isinstance(cid, str) or not isinstance(at_ms, int):
            return {"ok": False, "error": "command lacks cid or at_ms"}
        if cid in self.seen:
            return self.seen[cid][0]
        self._expire(at_ms)
        op = command.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            result: dict[str, Any] = {"ok": False, "error": f"unknown op {op!r}"}
        else:
            try:
                result = handler(self, command, at_ms)
            except Rejected as exc:
                result = {"ok": False, "error": str(exc)}
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                result = {"ok": False, "error": f"malformed {op}: {exc!r}"}
        self.seen[cid] = (result, at_ms + COMMAND_TTL_MS)
        return result

    def _expire(self, now_ms: int) -> None:
        """Forget command ids and idempotency keys whose TTL passed.

        Runs on every apply; cheap because entries are dropped in insertion
        order (dicts keep it) and expiry times grow roughly with it.
        """
        for table in (self.seen, self.idempotency):
            while table:
                key = next(iter(table))
                if table[key][1] > now_ms:
                    break
                del table[key]

    def _submit(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        out = []
        for spec in cmd["runs"]:
            try:
                out.append(self._submit_one(spec, at_ms))
            except Rejected as exc:
                run_id = spec.get("id") if isinstance(spec, dict) else None
                out.append({"id": run_id, "error": str(exc), "code": exc.code})
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # _submit_one mutates nothing before it can fail
                out.append({"id": spec.get("id"), "error": f"malformed run spec: {exc!r}"})
        return {"ok": True, "runs": out}

    def _submit_one(self, spec: Any, at_ms: int) -> dict[str, Any]:
        if not isinstance(spec, dict):
            raise Rejected("run spec is not a map")
        for name, kind in _RUN_FIELDS.items():
            if name in spec and not isinstance(spec[name], kind):
                raise Rejected(f"field {name} must be {kind.__name__}")
        key = spec.get("idempotency_key")
        tenant = spec.get("tenant") or "default"
        if key is not None:
            known = self.idempotency.get((tenant, key))
            if known is not None:
                return {"id": known[0], "created": False}
        run_id = spec["id"]
        existing = self.runs.get(run_id)
        if existing is not None:
            # A replay of the same submission; a different key under the same
            # id would answer one key with two runs.
            if existing.idempotency_key != key or existing.tenant != tenant:
                raise Rejected(f"run id {run_id} is taken by a run with another idempotency key")
            return {"id": run_id, "created": False}
        labels = spec.get("labels") or {}
        if not isinstance(labels, dict):
            raise Rejected("labels must be a map")
        budget = spec.get("budget")
        if budget is not None and not (
            isinstance(budget, dict) and all(isinstance(v, int) and v >= 0 for v in budget.values())
        ):
            raise Rejected("budget must map names to non-negative integers")
        memory_mb = spec.get("memory_limit_mb")
        if memory_mb is not None and (not isinstance(memory_mb, int) or memory_mb <= 0):
            raise Rejected("memory_limit_mb must be a positive integer")
        for name in _OPTIONAL_TEXT:
            if spec.get(name) is not None and not isinstance(spec[name], str):
                raise Rejected(f"field {name} must be str")
        limit = self.tenant_queue_limit(tenant)
        if limit is not None and self.queued_for_tenant(tenant) >= limit:
            raise QueueFull(f"tenant {tenant!r} already has {limit} queued runs (its maximum)")
        run = Run(
            id=run_id,
            agent=spec["agent"],
            input=spec.get("input"),
            tenant=tenant,
            priority=int(spec.get("priority") or 0),
            labels={str(k): str(v) for k, v in labels.items()},
            timeout_s=spec.get("timeout_s"),
            max_attempts=max(1, int(spec.get("max_attempts") or 1)),
            idempotency_key=key,
            parent_id=spec.get("parent_id"),
            submitted_at_ms=at_ms,
            depth=int(spec.get("depth") or 0),
            budget=None if budget is None else {str(k): v for k, v in budget.items()},
            isolation=str(spec.get("isolation") or "task"),
            memory_limit_mb=memory_mb,
            session=spec.get("session"),
            placement=spec.get("placement"),
            epoch=max(0, spec.get("epoch") or 0),
            attempts=max(0, spec.get("attempts") or 0),
        )
        self.runs[run_id] = run
        self._count_queued(run.tenant, 1)
        if key is not None:
            self.idempotency[(tenant, key)] = (run_id, at_ms + IDEMPOTENCY_TTL_MS)
        return {"id": run_id, "created": True}

    def _assign(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        for item in cmd["batch"]:
            try:
                run_id, peer_id, epoch = item
            except (TypeError, ValueError):
                rejected[str(item)] = "malformed assignment"
                continue
            try:
                self._check_assignable(run_id, peer_id, epoch, at_ms)
            except Rejected as exc:
                rejected[str(run_id)] = str(exc)
                continue
            run = self.runs[run_id]
            run.status = RUNNING
            run.owner = peer_id
            run.epoch = epoch
            run.attempts += 1
            run.assigned_at_ms = at_ms
            self._count_queued(run.tenant, -1)
            self.by_owner.setdefault(peer_id, set()).add(run_id)
            self.tenant_running[run.tenant] = self.tenant_running.get(run.tenant, 0) + 1
            accepted.append(run_id)
        return {"ok": True, "accepted": accepted, "rejected": rejected}

    def _check_assignable(self, run_id: Any, peer_id: Any, epoch: Any, at_ms: int) -> None:
        run = self.runs.get(run_id) if isinstance(run_id, str) else None
        if run is None:
            raise Rejected("unknown run")
        if run.status != QUEUED:
            raise Rejected(f"run is {run.status}")
        if not isinstance(epoch, int) or epoch != run.epoch + 1:
            raise Rejected(f"epoch {epoch} is not {run.epoch + 1}")
        if run.not_before_ms > at_ms:
            raise Rejected("run is backing off before its next attempt")
        peer = self.peers.get(peer_id) if isinstance(peer_id, str) else None
        if peer is None or peer.status != PEER_UP:
            raise Rejected("peer is not up")
        if not peer.schedulable:
            raise Rejected("peer is draining or stopping")
        if self.running_on(peer_id) >= peer.slots:
            raise Rejected("peer has no free slot")
        if any(peer.labels.get(k) != v for k, v in run.labels.items()):
            raise Rejected("peer labels do not match")
        if not peer.can_run(run.agent):
            raise Rejected("peer does not have the agent")
        cap = self.tenant_cap(run.tenant)
        if cap is not None and self.running_for_tenant(run.tenant) >= cap:
            raise Rejected("tenant at its in-flight cap")

    def _finish(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        run = self._owned_run(cmd["run"], cmd["epoch"])
        if cmd["status"] not in FINISH_STATUSES:
            raise Rejected(f"not a terminal status: {cmd['status']!r}")
        self._evict(run)
        return {"ok": True}

    def _release(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        run = self._owned_run(cmd["run"], cmd["epoch"])
        if run.cancel_requested:
            self._settle_as(run, "cancelled")
        else:
            self._requeue(run)
        return {"ok": True}

    def _fail(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        """An attempt failed on its owner: retry after a backoff, or settle."""
        run = self._owned_run(cmd["run"], cmd["epoch"])
        kind, error = cmd["kind"], cmd["error"]
        if kind not in FAILURE_KINDS:
            raise Rejected(f"unknown failure kind {kind!r}")
        if error is not None and not isinstance(error, str):
            raise Rejected("error must be text")
        if kind == "timeout":
            run.timeouts += 1
        else:
            run.errors += 1
        run.last_error = error
        retryable = kind == "error" or self.retry.retry_timeouts
        if run.cancel_requested:
            self._settle_as(run, "cancelled")
        elif retryable and self.retry.used(run) < run.max_attempts:
            self._requeue(run)
            policy = self.retry
            delay = backoff_ms(
                run.id, self.retry.used(run), policy.backoff_base_ms, policy.backoff_max_ms
            )
            run.not_before_ms = at_ms + delay
            return {"ok": True, "retry": True, "not_before_ms": run.not_before_ms}
        else:
            self._settle_as(run, "timed_out" if kind == "timeout" else "failed")
        return {"ok": True, "retry": False}

    def _cancel(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        """Cancel a run and every active run it spawned (children of a
        cancelled parent are of no use). Queued: settle as cancelled. Running:
        flag it; the owner stops the attempt and finishes it as cancelled (its
        own write is fenced). A run already ending otherwise is left alone."""
        run = self.runs.get(cmd["run"])
        if run is None:
            raise Rejected("run is not active")
        if run.status == SETTLING and run.outcome != "cancelled":
            raise Rejected(f"run is already ending as {run.outcome}")
        doomed = [run.id]
        for parent in doomed:  # grows while walking: breadth-first over descendants
            doomed.extend(r.id for r in self.runs.values() if r.parent_id == parent)
        for victim in (self.runs[i] for i in doomed):
            if victim.status == SETTLING:
                continue
            victim.cancel_requested = True
            if victim.status == QUEUED:
                self._settle_as(victim, "cancelled")
        return {"ok": True, "status": run.status, "cancelled": doomed}

    def _settle(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        """Storage holds the mesh-decided outcome now: forget the run."""
        run = self.runs.get(cmd["run"])
        if run is None or run.status != SETTLING:
            raise Rejected("run is not settling")
        del self.runs[run.id]
        return {"ok": True, "outcome": run.outcome}

    def _owned_run(self, run_id: str, epoch: int) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise Rejected("unknown run")
        if run.status != RUNNING or run.epoch != epoch:
            raise Rejected(f"stale epoch {epoch}: run is {run.status} at epoch {run.epoch}")
        return run

    def _peer_up(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        peer_id = cmd["peer"]
        slots = cmd["slots"]
        if not isinstance(peer_id, str) or not isinstance(slots, int) or slots < 0:
            raise Rejected("peer_up needs a peer id and a slot count")
        role = cmd.get("role") or VOTER
        if role not in ROLES:
            raise Rejected(f"unknown role {role!r}")
        known = self.peers.get(peer_id)
        if known is not None and known.status == PEER_LEFT:
            raise Rejected(f"peer {peer_id} has left the mesh; it must join again")
        peer = Peer(
            id=peer_id,
            incarnation=cmd["incarnation"],
            raft=cmd["raft"],
            http=cmd["http"],
            slots=slots,
            labels={str(k): str(v) for k, v in (cmd.get("labels") or {}).items()},
            status=PEER_UP,
            since_ms=at_ms,
            agents=_agent_list(cmd.get("agents")),
            role=role,
            drain=known.drain if known is not None else "",
        )
        requeued = 0
        if known is not None and known.incarnation != peer.incarnation:
            requeued = self._requeue_owned_by(peer_id)
        self.peers[peer_id] = peer
        return {"ok": True, "requeued": requeued}

    def _peer_down(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        peer = self.peers.get(cmd["peer"])
        if peer is None:
            raise Rejected("unknown peer")
        if peer.incarnation != cmd["incarnation"]:
            raise Rejected("peer has restarted since it was judged")
        if peer.status in (PEER_DOWN, PEER_LEFT):
            return {"ok": True, "requeued": 0}
        peer.status = PEER_DOWN
        peer.since_ms = at_ms
        return {"ok": True, "requeued": self._requeue_owned_by(peer.id)}

    def _peer_join(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        """Reserve an id (and a Raft address) before the joining process starts,
        so two joins with one id cannot both succeed. Repeating the same join
        is harmless, so a join interrupted half-way can be retried."""
        peer_id, raft, http, role = cmd["peer"], cmd["raft"], cmd["http"], cmd["role"]
        if not all(isinstance(v, str) and v for v in (peer_id, http)) or not isinstance(raft, str):
            raise Rejected("peer_join needs a peer id, a raft address and an http address")
        if role not in ROLES or (role == VOTER and not raft):
            raise Rejected(f"role must be one of {sorted(ROLES)}; a voter needs a raft address")
        known = self.peers.get(peer_id)
        if known is not None and known.status != PEER_LEFT:
            retry = (PEER_JOINING, raft, http, role)
            if (known.status, known.raft, known.http, known.role) == retry:
                return {"ok": True, "created": False}
            raise Rejected(
                f"peer id {peer_id!r} is already in use (status {known.status}); "
                "choose another id, or make the old peer leave first"
            )
        if role == VOTER:
            # The joiner counts as down until it has caught up and is promoted:
            # a join (or a pile of joins to made-up addresses) must never make
            # the voters that are up a minority.
            voters = [
                p
                for p in self.peers.values()
                if p.role == VOTER and p.status != PEER_LEFT and p.id != peer_id
            ]
            up = sum(1 for p in voters if p.status == PEER_UP)
            if up <= (len(voters) + 1) / 2:
                raise Rejected(
                    f"joining voter {peer_id} would make {len(voters) + 1} voters (pending joins "
                    f"included) of which only {up} are up until it has caught up: they could not "
                    "form a majority; bring voters back or let pending joins finish or expire first"
                )
        for other in self.peers.values():
            if other.status == PEER_LEFT or other.id == peer_id:
                continue
            if raft and other.raft == raft:
                raise Rejected(f"raft address {raft} is already used by peer {other.id!r}")
            if other.http == http:
                raise Rejected(f"http address {http} is already used by peer {other.id!r}")
        self.peers[peer_id] = Peer(
            id=peer_id,
            incarnation="",
            raft=raft,
            http=http,
            slots=0,
            status=PEER_JOINING,
            since_ms=at_ms,
            role=role,
        )
        return {"ok": True, "created": True}

    def _peer_drain(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        peer = self._member(cmd["peer"])
        mode = cmd["mode"]
        if mode not in DRAIN_MODES:
            raise Rejected(f"drain mode must be one of {sorted(DRAIN_MODES)}")
        peer.drain = mode
        return {"ok": True}

    def _peer_stopping(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        peer = self._member(cmd["peer"])
        if peer.incarnation != cmd["incarnation"]:
            raise Rejected("peer has restarted since it asked to stop")
        peer.stopping = True
        return {"ok": True}

    def _peer_leave(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        """Remove a peer for good. A voter may go only if the voters that remain
        and are up still form a majority of the voters that remain, unless
        ``force``: a recovered mesh drops the voters it lost for good, which
        are no longer Raft voters, so no majority depends on them."""
        peer = self._member(cmd["peer"])
        if peer.role == VOTER and not cmd.get("force"):
            remaining = [
                p
                for p in self.peers.values()
                if p.role == VOTER and p.status != PEER_LEFT and p.id != peer.id
            ]
            up = [p for p in remaining if p.status == PEER_UP]
            if not remaining:
                raise Rejected(f"{peer.id} is the last voter: the mesh cannot lose it")
            if len(up) <= len(remaining) / 2:
                raise Rejected(
                    f"removing voter {peer.id} would leave {len(remaining)} voters of which only "
                    f"{len(up)} are up: they could not form a majority; bring voters back first"
                )
        requeued = self._requeue_owned_by(peer.id)
        peer.status = PEER_LEFT
        peer.since_ms = at_ms
        peer.stopping = False
        return {"ok": True, "requeued": requeued}

    def _member(self, peer_id: Any) -> Peer:
        peer = self.peers.get(peer_id) if isinstance(peer_id, str) else None
        if peer is None or peer.status == PEER_LEFT:
            raise Rejected(f"no peer {peer_id!r} in this mesh")
        return peer

    def _configure(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        caps = _limits(cmd["tenant_caps"], "tenant caps")
        default = _limit(cmd["default_tenant_cap"], "default tenant cap")
        # Newer keys are optional, so an older proposer's configure still applies.
        max_queued = _limits(cmd.get("tenant_max_queued") or {}, "tenant queued maximums")
        default_max_queued = _limit(cmd.get("default_tenant_max_queued"), "default queued maximum")
        retry = cmd.get("retry") or {}
        if not isinstance(retry, dict):
            raise Rejected("retry policy must be a map")
        policy = RetryPolicy(**retry)
        if not (
            isinstance(policy.backoff_base_ms, int)
            and isinstance(policy.backoff_max_ms, int)
            and 0 <= policy.backoff_base_ms <= policy.backoff_max_ms
            and isinstance(policy.retry_timeouts, bool)
            and isinstance(policy.count_lost_owner, bool)
        ):
            raise Rejected("retry policy needs 0 <= backoff_base_ms <= backoff_max_ms and booleans")
        self.tenant_caps = caps
        self.default_tenant_cap = default
        self.tenant_max_queued = max_queued
        self.default_tenant_max_queued = default_max_queued
        self.retry = policy
        return {"ok": True}

    _handlers = {
        c.SUBMIT: _submit,
        c.ASSIGN: _assign,
        c.FINISH: _finish,
        c.RELEASE: _release,
        c.PEER_UP: _peer_up,
        c.PEER_DOWN: _peer_down,
        c.CONFIGURE: _configure,
        c.FAIL: _fail,
        c.CANCEL: _cancel,
        c.SETTLE: _settle,
        c.PEER_JOIN: _peer_join,
        c.PEER_DRAIN: _peer_drain,
        c.PEER_STOPPING: _peer_stopping,
        c.PEER_LEAVE: _peer_leave,
    }

    # -- transitions shared by handlers -----------------------------------

    def _stop_running(self, run: Run) -> None:
        if run.status != RUNNING or run.owner is None:
            return
        self.by_owner.get(run.owner, set()).discard(run.id)
        left = self.tenant_running.get(run.tenant, 0) - 1
        if left > 0:
            self.tenant_running[run.tenant] = left
        else:
            self.tenant_running.pop(run.tenant, None)

    def _requeue(self, run: Run) -> None:
        """Back to the queue; the epoch stays, so the next owner gets epoch + 1."""
        self._stop_running(run)
        if run.status != QUEUED:
            self._count_queued(run.tenant, 1)
        run.status = QUEUED
        run.owner = None
        run.assigned_at_ms = None

    def _requeue_owned_by(self, peer_id: str) -> int:
        """The owner is gone: its runs go back to the queue (failover), unless
        cancelled meanwhile or out of attempts when lost owners count."""
        owned = sorted(self.by_owner.get(peer_id, set()))
        for run_id in owned:
            run = self.runs[run_id]
            run.losses += 1
            if run.cancel_requested:
                self._settle_as(run, "cancelled")
            elif self.retry.count_lost_owner and self.retry.used(run) >= run.max_attempts:
                run.last_error = f"owner lost {run.losses} times"
                self._settle_as(run, "failed")
            else:
                self._requeue(run)
        return len(owned)

    def _settle_as(self, run: Run, outcome: str) -> None:
        self._stop_running(run)
        if run.status == QUEUED:
            self._count_queued(run.tenant, -1)
        run.status = SETTLING
        run.outcome = outcome
        run.owner = None
        run.assigned_at_ms = None

    def _evict(self, run: Run) -> None:
        self._stop_running(run)
        if run.status == QUEUED:
            self._count_queued(run.tenant, -1)
        del self.runs[run.id]

    def _count_queued(self, tenant: str, delta: int) -> None:
        left = self.tenant_queued.get(tenant, 0) + delta
        if left > 0:
            self.tenant_queued[tenant] = left
        else:
            self.tenant_queued.pop(tenant, None)

    # -- queries (used by the scheduler and the API; never mutate) --------

    def running_on(self, peer_id: str) -> int:
        return len(self.by_owner.get(peer_id, ()))

    def tenant_cap(self, tenant: str) -> int | None:
        return self.tenant_caps.get(tenant, self.default_tenant_cap)

    def running_for_tenant(self, tenant: str) -> int:
        return self.tenant_running.get(tenant, 0)

    def tenant_queue_limit(self, tenant: str) -> int | None:
        return self.tenant_max_queued.get(tenant, self.default_tenant_max_queued)

    def queued_for_tenant(self, tenant: str) -> int:
        return self.tenant_queued.get(tenant, 0)

    def settling(self) -> list[Run]:
        return [r for r in self.runs.values() if r.status == SETTLING]

    def cancelling(self, peer_id: str) -> list[Run]:
        return [r for r in self.owned_by(peer_id) if r.cancel_requested]

    def queued(self) -> list[Run]:
        """Queued runs in scheduling order: priority first, then age."""
        waiting = [r for r in self.runs.values() if r.status == QUEUED]
        waiting.sort(key=lambda r: (-r.priority, r.submitted_at_ms, r.id))
        return waiting

    def owned_by(self, peer_id: str) -> list[Run]:
        return [self.runs[i] for i in sorted(self.by_owner.get(peer_id, ()))]

    def peer_by_raft(self, raft_addr: str) -> Peer | None:
        for peer in self.peers.values():
            if peer.raft == raft_addr:
                return peer
        return None

    # -- snapshots --------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1,
            "runs": [r.public() for r in self.runs.values()],
            "peers": [p.public() for p in self.peers.values()],
            "idempotency": [[list(k), v[0], v[1]] for k, v in self.idempotency.items()],
            "seen": [[k, v[0], v[1]] for k, v in self.seen.items()],
            "tenant_caps": self.tenant_caps,
            "default_tenant_cap": self.default_tenant_cap,
            "tenant_max_queued": self.tenant_max_queued,
            "default_tenant_max_queued": self.default_tenant_max_queued,
            "retry": dict(self.retry.__dict__),
            "applied": self.applied,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeshState:
        state = cls()
        state.runs = {r["id"]: Run(**r) for r in data["runs"]}
        state.peers = {p["id"]: Peer(**p) for p in data["peers"]}
        state.idempotency = {
            # a key from before tenants scoped them was the default tenant's
            (tuple(k) if isinstance(k, list | tuple) else ("default", k)): (run_id, exp)
            for k, run_id, exp in data["idempotency"]
        }
        state.seen = {k: (res, exp) for k, res, exp in data["seen"]}
        state.tenant_caps = dict(data["tenant_caps"])
        state.default_tenant_cap = data["default_tenant_cap"]
        state.tenant_max_queued = dict(data.get("tenant_max_queued") or {})
        state.default_tenant_max_queued = data.get("default_tenant_max_queued")
        state.retry = RetryPolicy(**(data.get("retry") or {}))
        state.applied = data["applied"]
        for run in state.runs.values():
            if run.status == QUEUED:
                state._count_queued(run.tenant, 1)
            if run.status == RUNNING and run.owner is not None:
                state.by_owner.setdefault(run.owner, set()).add(run.id)
                state.tenant_running[run.tenant] = state.tenant_running.get(run.tenant, 0) + 1
        return state


def _limit(value: Any, what: str) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 0):
        raise Rejected(f"{what} must be a non-negative integer")
    return value


def _limits(values: Any, what: str) -> dict[str, int]:
    if not isinstance(values, dict) or not all(
        isinstance(v, int) and v >= 0 for v in values.values()
    ):
        raise Rejected(f"{what} must map tenants to non-negative integers")
    return {str(k): v for k, v in values.items()}
