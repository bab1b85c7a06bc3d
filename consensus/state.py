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

from dataclasses import dataclass, field
from typing import Any

from consensus import commands as c

QUEUED = "queued"
RUNNING = "running"
FINISH_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timed_out"})

PEER_UP = "up"
PEER_DOWN = "down"

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

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)

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


_RUN_FIELDS = {
    "id": str,
    "agent": str,
    "tenant": str,
    "priority": int,
    "max_attempts": int,
}


class MeshState:
    """The whole replicated state; mutated only through ``apply``."""

    def __init__(self) -> None:
        self.runs: dict[str, Run] = {}
        self.peers: dict[str, Peer] = {}
        self.by_owner: dict[str, set[str]] = {}
        self.tenant_running: dict[str, int] = {}
        self.idempotency: dict[str, tuple[str, int]] = {}
        self.seen: dict[str, tuple[Any, int]] = {}
        self.tenant_caps: dict[str, int] = {}
        self.default_tenant_cap: int | None = None
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
                out.append({"id": spec.get("id") if isinstance(spec, dict) else None, "error": str(exc)})
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
        if key is not None:
            known = self.idempotency.get(key)
            if known is not None:
                return {"id": known[0], "created": False}
        run_id = spec["id"]
        existing = self.runs.get(run_id)
        if existing is not None:
            # A replay of the same submission; a different key under the same
            # id would answer one key with two runs.
            if existing.idempotency_key != key:
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
        run = Run(
            id=run_id,
            agent=spec["agent"],
            input=spec.get("input"),
            tenant=spec.get("tenant") or "default",
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
        )
        self.runs[run_id] = run
        if key is not None:
            self.idempotency[key] = (run_id, at_ms + IDEMPOTENCY_TTL_MS)
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
                self._check_assignable(run_id, peer_id, epoch)
            except Rejected as exc:
                rejected[str(run_id)] = str(exc)
                continue
            run = self.runs[run_id]
            run.status = RUNNING
            run.owner = peer_id
            run.epoch = epoch
            run.attempts += 1
            run.assigned_at_ms = at_ms
            self.by_owner.setdefault(peer_id, set()).add(run_id)
            self.tenant_running[run.tenant] = self.tenant_running.get(run.tenant, 0) + 1
            accepted.append(run_id)
        return {"ok": True, "accepted": accepted, "rejected": rejected}

    def _check_assignable(self, run_id: Any, peer_id: Any, epoch: Any) -> None:
        run = self.runs.get(run_id) if isinstance(run_id, str) else None
        if run is None:
            raise Rejected("unknown run")
        if run.status != QUEUED:
            raise Rejected(f"run is {run.status}")
        if not isinstance(epoch, int) or epoch != run.epoch + 1:
            raise Rejected(f"epoch {epoch} is not {run.epoch + 1}")
        peer = self.peers.get(peer_id) if isinstance(peer_id, str) else None
        if peer is None or peer.status != PEER_UP:
            raise Rejected("peer is not up")
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
        self._requeue(run)
        return {"ok": True}

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
        )
        known = self.peers.get(peer_id)
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
        if peer.status == PEER_DOWN:
            return {"ok": True, "requeued": 0}
        peer.status = PEER_DOWN
        peer.since_ms = at_ms
        return {"ok": True, "requeued": self._requeue_owned_by(peer.id)}

    def _cancel(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        """Cancel an active run and, with it, every active run it spawned
        (children, grandchildren, ...): a cancelled parent's children are of no use."""
        run_id = cmd["run_id"]
        if not isinstance(run_id, str) or run_id not in self.runs:
            raise Rejected("unknown or finished run")
        doomed = [run_id]
        for parent in doomed:  # grows while walking: breadth-first over descendants
            doomed.extend(r.id for r in self.runs.values() if r.parent_id == parent)
        for victim in doomed:
            self._evict(self.runs[victim])
        return {"ok": True, "cancelled": doomed}

    def _configure(self, cmd: dict[str, Any], at_ms: int) -> dict[str, Any]:
        caps = cmd["tenant_caps"]
        default = cmd["default_tenant_cap"]
        if not all(isinstance(v, int) and v >= 0 for v in caps.values()):
            raise Rejected("tenant caps must be non-negative integers")
        if default is not None and (not isinstance(default, int) or default < 0):
            raise Rejected("default tenant cap must be a non-negative integer")
        self.tenant_caps = {str(k): v for k, v in caps.items()}
        self.default_tenant_cap = default
        return {"ok": True}

    _handlers = {
        c.SUBMIT: _submit,
        c.ASSIGN: _assign,
        c.FINISH: _finish,
        c.RELEASE: _release,
        c.PEER_UP: _peer_up,
        c.PEER_DOWN: _peer_down,
        c.CONFIGURE: _configure,
        c.CANCEL: _cancel,
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
        run.status = QUEUED
        run.owner = None
        run.assigned_at_ms = None

    def _requeue_owned_by(self, peer_id: str) -> int:
        owned = sorted(self.by_owner.get(peer_id, set()))
        for run_id in owned:
            self._requeue(self.runs[run_id])
        return len(owned)

    def _evict(self, run: Run) -> None:
        self._stop_running(run)
        del self.runs[run.id]

    # -- queries (used by the scheduler and the API; never mutate) --------

    def running_on(self, peer_id: str) -> int:
        return len(self.by_owner.get(peer_id, ()))

    def tenant_cap(self, tenant: str) -> int | None:
        return self.tenant_caps.get(tenant, self.default_tenant_cap)

    def running_for_tenant(self, tenant: str) -> int:
        return self.tenant_running.get(tenant, 0)

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
            "idempotency": [[k, v[0], v[1]] for k, v in self.idempotency.items()],
            "seen": [[k, v[0], v[1]] for k, v in self.seen.items()],
            "tenant_caps": self.tenant_caps,
            "default_tenant_cap": self.default_tenant_cap,
            "applied": self.applied,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeshState:
        state = cls()
        state.runs = {r["id"]: Run(**r) for r in data["runs"]}
        state.peers = {p["id"]: Peer(**p) for p in data["peers"]}
        state.idempotency = {k: (run_id, exp) for k, run_id, exp in data["idempotency"]}
        state.seen = {k: (res, exp) for k, res, exp in data["seen"]}
        state.tenant_caps = dict(data["tenant_caps"])
        state.default_tenant_cap = data["default_tenant_cap"]
        state.applied = data["applied"]
        for run in state.runs.values():
            if run.status == RUNNING and run.owner is not None:
                state.by_owner.setdefault(run.owner, set()).add(run.id)
                state.tenant_running[run.tenant] = state.tenant_running.get(run.tenant, 0) + 1
        return state
