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
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.commands import COMMAND_TTL_MS
from raftmesh.consensus.eligibility import PEER_WIDE, why_not
from raftmesh.consensus.model import (
    DRAIN_MODES,
    PEER_DOWN,
    PEER_JOINING,
    PEER_LEFT,
    PEER_UP,
    ROLES,
    VOTER,
    Peer,
    Run,
)
from raftmesh.consensus.results import Rejected, Rejection, Result
from raftmesh.consensus.run_queue import RunQueue
from raftmesh.consensus.schedules import (
    OVERLAP_CANCEL_PREVIOUS,
    OVERLAP_SKIP,
    Schedule,
    ScheduleInvalid,
    check_definition,
    tick_key,
    tick_run_id,
)
from raftmesh.consensus.spec import CONSISTENT_HASH, RunSpec
from raftmesh.consensus.status import TERMINAL_STATUSES, RunStatus
from raftmesh.consensus.waits import InvalidWait, checked_wait, valid_signal_name, wait_satisfied

log = logging.getLogger("raftmesh.state")

FAILURE_KINDS = frozenset({"error", "timeout"})

IDEMPOTENCY_TTL_MS = 24 * 3600 * 1000
# Every command id of the last command_ttl_ms is in the state and its
# snapshot (commands.COMMAND_TTL_MS at most): the leader replicates a shorter
# window once every peer applies it. The least it may be: past any proposer's
# retries of one command (a commit budget of seconds) and any election that
# could commit a copy of it late.
MIN_COMMAND_TTL_MS = 10_000
# The window the leader replicates.
SHORT_COMMAND_TTL_MS = 60_000
# Schedules live in the state for good (until deleted): a bound keeps it small.
MAX_SCHEDULES = 10_000


def _agent_list(agents: Any) -> list[str] | None:
    if agents is None:
        return None
    if not isinstance(agents, list) or not all(isinstance(a, str) for a in agents):
        raise Refused("agents must be a list of names")
    return sorted(agents)


class Refused(Exception):
    """Internal control flow: a command (or one item of a batch) is refused."""

    def __init__(self, message: str, reason: Rejection = Rejection.INVALID) -> None:
        super().__init__(message)
        self.reason = reason


_RUN_TEXT = ("id", "agent", "tenant")
_OPTIONAL_TEXT = (
    "session",
    "placement",
    "idempotency_key",
    "parent_id",
    "isolation",
    "trace_parent",
)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Clock readings and delays in ms: far beyond any real clock, and small enough
# that adding a TTL or a backoff to one stays an int64.
MAX_MS = 2**53
# Queued runs a finish looks through for one its peer may run (see _hand_off).
HANDOFF_SCAN = 64
# What this release's apply does that an earlier release's does not. Peers
# report it to the leader, which turns such a policy on only once every member
# does: a peer that applied the same log without it would drift apart.
APPLY_FEATURES = frozenset({"handoff", "prefetch", "command_ttl_ms"})
# Runs a peer may hold ready beyond its slots (see eligibility.capacity).
MAX_PREFETCH = 10_000
# The bound RunSpec.from_wire (consensus/spec.py) allows: about 31 years.
MAX_TIMEOUT_S = 1e9
# Deeper than the API lets through (mesh/schemas.MAX_NESTING), well inside
# what msgpack packs and unpacks (512 with the entry around it).
MAX_NESTING = 128
# Waiting and paused runs have no owner: a cancel settles them like queued ones.
_OWNERLESS = frozenset({RunStatus.QUEUED, RunStatus.WAITING, RunStatus.PAUSED})
# One wake names at most this many runs (the leader batches below it).
MAX_BATCH = 10_000
# Distinct signal names one run may be sent: each costs the state an entry.
MAX_SIGNAL_NAMES = 256


def _int(value: Any, what: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """An integer the snapshot (msgpack, int64) can carry; ``True`` is not a number here."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Refused(f"{what} must be an integer from {low} to {high}, not {value!r}")
    return value


def _plain(value: Any, what: str, depth: int = 0) -> Any:
    """A value msgpack carries and that equals itself: no nan, no inf, no int
    wider than 64 bits, nested no deeper than a snapshot can hold."""
    if depth > MAX_NESTING:
        raise Refused(f"{what} is nested more than {MAX_NESTING} levels deep")
    if value is None or isinstance(value, bool | str | bytes):
        return value
    if isinstance(value, int):
        return _int(value, what, INT64_MIN, 2**64 - 1)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Refused(f"{what} must be a finite number, not {value!r}")
        return value
    if isinstance(value, list):
        return [_plain(v, what, depth + 1) for v in value]
    if isinstance(value, dict):
        return {_plain(k, what, depth + 1): _plain(v, what, depth + 1) for k, v in value.items()}
    raise Refused(f"{what} holds a {type(value).__name__}")


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
        # Derived indexes, rebuilt from the runs on restore: the leader's tick
        # reads these instead of scanning every run.
        self.queue = RunQueue()
        self.waiting_ids: set[str] = set()
        self.settling_ids: set[str] = set()
        # (tenant, idempotency key) -> (run id, expiry): one tenant's key never
        # finds another tenant's run.
        self.idempotency: dict[tuple[str, str], tuple[str, int]] = {}
        self.seen: dict[str, tuple[Any, int]] = {}
        self.tenant_caps: dict[str, int] = {}
        self.default_tenant_cap: int | None = None
        self.tenant_max_queued: dict[str, int] = {}
        self.default_tenant_max_queued: int | None = None
        self.retry = RetryPolicy()
        # Replicated with the policy, so apply orders the queue as the leader does.
        self.aging_ms = 0
        self.handoff = False
        self.prefetch = 0
        self.command_ttl_ms = COMMAND_TTL_MS
        self.schedules: dict[str, Schedule] = {}
        self.applied = 0

    # -- applying ---------------------------------------------------------

    def apply(self, command: c.Command | Any) -> Result:
        """Apply one command, typed or in wire form; return its result.

        Never raises: pysyncobj would retry a raising apply forever, on every
        peer, and no later command would apply. This is the last guard: every
        replica applies the same command to the same state, so every replica
        takes the same path through it and they stay alike. The checks in the
        handlers come before their changes, so a refusal changes nothing.
        """
        self.applied += 1
        try:
            return self._apply(command)
        except Exception as exc:
            op, cid = (getattr(command, k, None) for k in ("op", "cid"))
            log.exception("apply of %s %s raised; refusing the command", op, cid)
            return Rejected(Rejection.INTERNAL, f"the command failed on apply: {exc!r}")

    def _apply(self, command: c.Command | Any) -> Result:
        typed = isinstance(command, c.Command)
        try:
            cid, at_ms = (command.cid, command.at_ms) if typed else c.decode_header(command)
        except c.CommandDecodeError as exc:
            return Rejected(Rejection.MALFORMED, str(exc))
        if not 0 <= at_ms <= MAX_MS:
            return Rejected(Rejection.MALFORMED, f"at_ms {at_ms} is not a clock reading")
        if cid in self.seen:
            return self.seen[cid][0]
        self._expire(at_ms)
        try:
            cmd = command if typed else c.decode(command)
            result = self._handlers[cmd.op](self, cmd, at_ms)
        except c.CommandDecodeError as exc:
            result = Rejected(Rejection.MALFORMED, str(exc))
        except Refused as exc:
            result = Rejected(exc.reason, str(exc))
        self.seen[cid] = (result, at_ms + self.command_ttl_ms)
        return result

    def _expire(self, now_ms: int) -> None:
        """Forget command ids and idempotency keys whose TTL passed.

        Runs on every apply; cheap because entries are dropped in insertion
        order (dicts keep it) and expiry times grow roughly with it.
        """
        _expire_oldest(self.seen, now_ms)
        _expire_oldest(self.idempotency, now_ms)

    def _submit(self, cmd: c.Submit, at_ms: int) -> res.Submitted:
        out = []
        for spec in cmd.runs:
            try:
                out.append(self._submit_one(spec, at_ms))
            except Refused as exc:
                out.append(res.RunOutcome(_spec_id(spec), rejection=exc.reason, message=str(exc)))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # _submit_one mutates nothing before it can fail
                message = f"malformed run spec: {exc!r}"
                out.append(
                    res.RunOutcome(_spec_id(spec), rejection=Rejection.MALFORMED, message=message)
                )
        return res.Submitted(out)

    def _submit_one(self, spec: Any, at_ms: int) -> res.RunOutcome:
        if not isinstance(spec, dict):
            raise Refused("run spec is not a map")
        for name in _RUN_TEXT:
            if name in spec and not isinstance(spec[name], str):
                raise Refused(f"field {name} must be str")
        for name in _OPTIONAL_TEXT:
            if spec.get(name) is not None and not isinstance(spec[name], str):
                raise Refused(f"field {name} must be str")
        lows = {"priority": INT64_MIN, "max_attempts": INT64_MIN, "epoch": INT64_MIN}
        lows |= {"attempts": INT64_MIN, "depth": 0}
        numbers = {
            name: _int(spec.get(name) or 0, f"field {name}", low) for name, low in lows.items()
        }
        timeout_s = spec.get("timeout_s")
        if timeout_s is not None and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not 0 < timeout_s <= MAX_TIMEOUT_S
        ):
            raise Refused(f"timeout_s must be a number of seconds up to {MAX_TIMEOUT_S:.0f}")
        run_input = _plain(spec.get("input"), "input")
        key = spec.get("idempotency_key")
        tenant = spec.get("tenant") or "default"
        run_id = spec["id"]
        if key is not None:
            known = self.idempotency.get((tenant, key))
            # The key's own run coming back under its id is a retry of that
            # dead letter (nothing else submits an existing id): it is queued
            # again, not answered with itself.
            if known is not None and (known[0] != run_id or run_id in self.runs):
                return res.RunOutcome(known[0])
        existing = self.runs.get(run_id)
        if existing is not None:
            # A replay of the same submission; a different key under the same
            # id would answer one key with two runs.
            if existing.spec.idempotency_key != key or existing.spec.tenant != tenant:
                raise Refused(
                    f"run id {run_id} is taken by a run with another idempotency key",
                    Rejection.CONFLICT,
                )
            return res.RunOutcome(run_id)
        labels = spec.get("labels") or {}
        if not isinstance(labels, dict):
            raise Refused("labels must be a map")
        budget = spec.get("budget")
        if budget is not None:
            if not isinstance(budget, dict):
                raise Refused("budget must map names to non-negative integers")
            budget = {str(k): _int(v, "a budget", 0) for k, v in budget.items()}
        memory_mb = spec.get("memory_limit_mb")
        if memory_mb is not None:
            _int(memory_mb, "memory_limit_mb", 1)
        limit = self.tenant_queue_limit(tenant)
        if limit is not None and self.queued_for_tenant(tenant) >= limit:
            raise Refused(
                f"tenant {tenant!r} already has {limit} queued runs (its maximum)",
                Rejection.TENANT_QUEUE_FULL,
            )
        run = Run(
            id=run_id,
            spec=RunSpec(
                agent=spec["agent"],
                input=run_input,
                tenant=tenant,
                priority=numbers["priority"],
                labels={str(k): str(v) for k, v in labels.items()},
                timeout_s=timeout_s,
                max_attempts=max(1, numbers["max_attempts"]),
                idempotency_key=key,
                parent_id=spec.get("parent_id"),
                depth=numbers["depth"],
                budget=budget,
                isolation=str(spec.get("isolation") or "task"),
                memory_limit_mb=memory_mb,
                session=spec.get("session"),
                placement=spec.get("placement"),
                trace_parent=spec.get("trace_parent"),
            ),
            submitted_at_ms=at_ms,
            epoch=max(0, numbers["epoch"]),
            attempts=max(0, numbers["attempts"]),
        )
        self.runs[run_id] = run
        self._index(run)
        if key is not None:
            self.idempotency[(tenant, key)] = (run_id, at_ms + IDEMPOTENCY_TTL_MS)
        return res.RunOutcome(run_id, created=True)

    def _assign(self, cmd: c.Assign, at_ms: int) -> res.Assigned:
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        for item in cmd.batch:
            try:
                run_id, peer_id, epoch = item
            except (TypeError, ValueError):
                rejected[str(item)] = "malformed assignment"
                continue
            try:
                self._check_assignable(run_id, peer_id, epoch, at_ms)
            except Refused as exc:
                rejected[str(run_id)] = str(exc)
                continue
            self._start(self.runs[run_id], peer_id, at_ms)
            accepted.append(run_id)
        return res.Assigned(accepted, rejected)

    def _start(self, run: Run, peer_id: str, at_ms: int) -> None:
        """A queued run, checked eligible, runs on ``peer_id`` under its next epoch."""
        self._unindex(run)
        run.status = RunStatus.RUNNING
        run.owner = peer_id
        run.epoch += 1
        run.attempts += 1
        run.assigned_at_ms = at_ms
        self._index(run)

    def _check_assignable(self, run_id: Any, peer_id: Any, epoch: Any, at_ms: int) -> None:
        run = self.runs.get(run_id) if isinstance(run_id, str) else None
        if run is None:
            raise Refused("unknown run", Rejection.UNKNOWN_RUN)
        peer = self.peers.get(peer_id) if isinstance(peer_id, str) else None
        if peer is None:
            raise Refused("peer is not up")
        reason = why_not(run, peer, self, at_ms)
        if reason is not None:
            raise Refused(reason.message)
        if not isinstance(epoch, int) or epoch != run.epoch + 1:
            raise Refused(f"epoch {epoch} is not {run.epoch + 1}")

    def _finish(self, cmd: c.Finish, at_ms: int) -> Result:
        run = self._owned_run(cmd.run, cmd.epoch)
        if cmd.status not in TERMINAL_STATUSES:
            raise Refused(f"not a terminal status: {cmd.status!r}")
        owner = run.owner
        self._evict(run)
        if self.handoff and owner is not None:
            handed = self._hand_off(owner, at_ms)
            if handed is not None:
                return res.Finished(handed.id)
        return res.Done()

    def _hand_off(self, peer_id: str, at_ms: int) -> Run | None:
        """The slot a finish freed goes at once to the first queued run, in the
        leader's order, that may run on that peer: a slot turn costs one commit
        instead of a finish, a leader tick and an assign. Consistent-hash runs
        are left to the leader (their home may be another peer), and so is a
        queue whose first ``HANDOFF_SCAN`` runs cannot go to this peer."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return None
        ordered = self.queue.ordered(at_ms, self.aging_ms)
        for run in itertools.islice(ordered, HANDOFF_SCAN):
            if run.spec.placement == CONSISTENT_HASH:
                continue
            reason = why_not(run, peer, self, at_ms)
            if reason is None:
                self._start(run, peer_id, at_ms)
                return run
            if reason.code in PEER_WIDE:
                return None
        return None

    def _release(self, cmd: c.Release, at_ms: int) -> Result:
        run = self._owned_run(cmd.run, cmd.epoch)
        if run.cancel_requested:
            self._settle_as(run, RunStatus.CANCELLED)
        else:
            self._requeue_or_pause(run)
        return res.Done()

    def _fail(self, cmd: c.Fail, at_ms: int) -> Result:
        """An attempt failed on its owner: retry after a backoff, or settle."""
        run = self._owned_run(cmd.run, cmd.epoch)
        kind, error = cmd.kind, cmd.error
        if kind not in FAILURE_KINDS:
            raise Refused(f"unknown failure kind {kind!r}")
        if error is not None and not isinstance(error, str):
            raise Refused("error must be text")
        if kind == "timeout":
            run.timeouts += 1
        else:
            run.errors += 1
        run.last_error = error
        retryable = kind == "error" or self.retry.retry_timeouts
        if run.cancel_requested:
            self._settle_as(run, RunStatus.CANCELLED)
        elif retryable and self.retry.used(run) < run.spec.max_attempts:
            self._requeue_or_pause(run)
            policy = self.retry
            delay = backoff_ms(
                run.id, self.retry.used(run), policy.backoff_base_ms, policy.backoff_max_ms
            )
            run.not_before_ms = at_ms + delay
            return res.AttemptFailed(retry=True, not_before_ms=run.not_before_ms)
        else:
            self._settle_as(run, RunStatus.TIMED_OUT if kind == "timeout" else RunStatus.FAILED)
        return res.AttemptFailed(retry=False)

    def _cancel(self, cmd: c.Cancel, at_ms: int) -> Result:
        """Cancel a run and every active run it spawned (children of a
        cancelled parent are of no use). Queued: settle as cancelled. Running:
        flag it; the owner stops the attempt and finishes it as cancelled (its
        own write is fenced). Waiting or paused: no owner to ask, settle at
        once. A run already ending otherwise is left alone."""
        run = self.runs.get(cmd.run)
        if run is None:
            raise Refused("run is not active", Rejection.UNKNOWN_RUN)
        if run.status == RunStatus.SETTLING and run.outcome != RunStatus.CANCELLED:
            raise Refused(f"run is already ending as {run.outcome}", Rejection.CONFLICT)
        doomed = [run.id]
        for parent in doomed:  # grows while walking: breadth-first over descendants
            doomed.extend(r.id for r in self.runs.values() if r.spec.parent_id == parent)
        for victim in (self.runs[i] for i in doomed):
            if victim.status == RunStatus.SETTLING:
                continue
            victim.cancel_requested = True
            if victim.status in _OWNERLESS:
                self._settle_as(victim, RunStatus.CANCELLED)
        return res.CancelRequested(run.status, doomed)

    def _settle(self, cmd: c.Settle, at_ms: int) -> Result:
        """Storage holds the mesh-decided outcome now: forget the run."""
        run = self.runs.get(cmd.run)
        if run is None or run.status != RunStatus.SETTLING:
            raise Refused("run is not settling", Rejection.CONFLICT)
        self._evict(run)
        return res.Settled(run.outcome)

    # -- suspension (issue 11) --------------------------------------------

    def _suspend(self, cmd: c.Suspend, at_ms: int) -> Result:
        """The owner's attempt waits: it leaves its slot, and the leader wakes
        it (``wake``) once consensus/waits.py says the wait is over."""
        run = self._owned_run(cmd.run, cmd.epoch)
        try:
            wait = checked_wait(cmd.wait)
        except InvalidWait as exc:
            raise Refused(str(exc)) from exc
        if run.cancel_requested:
            self._settle_as(run, RunStatus.CANCELLED)
            return res.Suspended(run.status)
        self._park(run, RunStatus.PAUSED if run.pause_requested else RunStatus.WAITING)
        run.waiting_for = wait
        return res.Suspended(run.status)

    def _wake(self, cmd: c.Wake, at_ms: int) -> Result:
        if len(cmd.runs) > MAX_BATCH:
            raise Refused(f"a wake names at most {MAX_BATCH} runs")
        woken: list[str] = []
        skipped: list[str] = []
        for run_id in cmd.runs:
            run = self.runs.get(run_id) if isinstance(run_id, str) else None
            if run is None or not wait_satisfied(run, self, at_ms):
                skipped.append(str(run_id))
                continue
            self._requeue(run)
            run.waiting_for = None
            woken.append(run.id)
        return res.Woken(woken, skipped)

    def _signal(self, cmd: c.Signal, at_ms: int) -> Result:
        if not valid_signal_name(cmd.name):
            raise Refused("a signal name is 1 to 128 of A-Za-z0-9_.:-")
        seq = _int(cmd.seq, "seq", 0, INT64_MAX - 1)
        run = self.runs.get(cmd.run)
        if run is None:
            raise Refused("run is not active", Rejection.UNKNOWN_RUN)
        if run.status == RunStatus.SETTLING:
            raise Refused(f"run is ending as {run.outcome}", Rejection.CONFLICT)
        if cmd.name not in run.signals and len(run.signals) >= MAX_SIGNAL_NAMES:
            raise Refused(f"a run takes signals of at most {MAX_SIGNAL_NAMES} names")
        run.signals[cmd.name] = max(run.signals.get(cmd.name, 0), seq + 1)
        return res.Signalled(run.signals[cmd.name])

    def _pause(self, cmd: c.Pause, at_ms: int) -> Result:
        """Queued or waiting: park it now (a waiting run keeps its wait).
        Running: ask the owner to release it at its next step boundary."""
        run = self._active_run(cmd.run)
        if run.status in (RunStatus.QUEUED, RunStatus.WAITING):
            self._park(run, RunStatus.PAUSED)
        elif run.status == RunStatus.RUNNING:
            run.pause_requested = True
        elif run.status != RunStatus.PAUSED:
            raise Refused(f"a {run.status} run cannot be paused", Rejection.CONFLICT)
        return res.PauseChanged(run.status, run.pause_requested)

    def _resume(self, cmd: c.Resume, at_ms: int) -> Result:
        """Paused: back to the queue (a run paused in a wait replays to it and
        waits again if it is not over). Running: withdraw the pause request."""
        run = self._active_run(cmd.run)
        if run.status == RunStatus.PAUSED:
            self._requeue(run)
            run.waiting_for = None
        elif run.status == RunStatus.RUNNING and run.pause_requested:
            run.pause_requested = False
        else:
            raise Refused(f"run is {run.status}, not paused", Rejection.CONFLICT)
        return res.PauseChanged(run.status, run.pause_requested)

    def _active_run(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise Refused("run is not active", Rejection.UNKNOWN_RUN)
        return run

    # -- ownership --------------------------------------------------------

    def _owned_run(self, run_id: str, epoch: int) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise Refused("unknown run", Rejection.UNKNOWN_RUN)
        if run.status != RunStatus.RUNNING or run.epoch != epoch:
            raise Refused(
                f"stale epoch {epoch}: run is {run.status} at epoch {run.epoch}",
                Rejection.STALE_EPOCH,
            )
        return run

    def _peer_up(self, cmd: c.PeerUp, at_ms: int) -> Result:
        peer_id = cmd.peer
        slots = _int(cmd.slots, "slots", 0)
        role = cmd.role or VOTER
        if role not in ROLES:
            raise Refused(f"unknown role {role!r}")
        known = self.peers.get(peer_id)
        if known is not None and known.status == PEER_LEFT:
            raise Refused(
                f"peer {peer_id} has left the mesh; it must join again", Rejection.CONFLICT
            )
        peer = Peer(
            id=peer_id,
            incarnation=cmd.incarnation,
            raft=cmd.raft,
            http=cmd.http,
            slots=slots,
            labels={str(k): str(v) for k, v in (cmd.labels or {}).items()},
            status=PEER_UP,
            since_ms=at_ms,
            agents=_agent_list(cmd.agents),
            role=role,
            drain=known.drain if known is not None else "",
        )
        requeued = 0
        if known is not None and known.incarnation != peer.incarnation:
            requeued = self._requeue_owned_by(peer_id)
        self.peers[peer_id] = peer
        return res.Requeued(requeued)

    def _peer_down(self, cmd: c.PeerDown, at_ms: int) -> Result:
        peer = self.peers.get(cmd.peer)
        if peer is None:
            raise Refused("unknown peer", Rejection.UNKNOWN_PEER)
        if peer.incarnation != cmd.incarnation:
            raise Refused("peer has restarted since it was judged", Rejection.CONFLICT)
        if peer.status in (PEER_DOWN, PEER_LEFT):
            return res.Requeued(0)
        peer.status = PEER_DOWN
        peer.since_ms = at_ms
        return res.Requeued(self._requeue_owned_by(peer.id))

    def _peer_join(self, cmd: c.PeerJoin, at_ms: int) -> Result:
        """Reserve an id (and a Raft address) before the joining process starts,
        so two joins with one id cannot both succeed. Repeating the same join
        is harmless, so a join interrupted half-way can be retried."""
        peer_id, raft, http, role = cmd.peer, cmd.raft, cmd.http, cmd.role
        if not all(isinstance(v, str) and v for v in (peer_id, http)) or not isinstance(raft, str):
            raise Refused("peer_join needs a peer id, a raft address and an http address")
        if role not in ROLES or (role == VOTER and not raft):
            raise Refused(f"role must be one of {sorted(ROLES)}; a voter needs a raft address")
        known = self.peers.get(peer_id)
        if known is not None and known.status != PEER_LEFT:
            retry = (PEER_JOINING, raft, http, role)
            if (known.status, known.raft, known.http, known.role) == retry:
                return res.Joined(created=False)
            raise Refused(
                f"peer id {peer_id!r} is already in use (status {known.status}); "
                "choose another id, or make the old peer leave first",
                Rejection.CONFLICT,
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
                raise Refused(
                    f"joining voter {peer_id} would make {len(voters) + 1} voters (pending joins "
                    f"included) of which only {up} are up until it has caught up: they could not "
                    "form a majority; bring voters back or let pending joins finish or expire first",
                    Rejection.CONFLICT,
                )
        for other in self.peers.values():
            if other.status == PEER_LEFT or other.id == peer_id:
                continue
            if raft and other.raft == raft:
                raise Refused(
                    f"raft address {raft} is already used by peer {other.id!r}", Rejection.CONFLICT
                )
            if other.http == http:
                raise Refused(
                    f"http address {http} is already used by peer {other.id!r}", Rejection.CONFLICT
                )
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
        return res.Joined(created=True)

    def _peer_drain(self, cmd: c.PeerDrain, at_ms: int) -> Result:
        peer = self._member(cmd.peer)
        mode = cmd.mode
        if mode not in DRAIN_MODES:
            raise Refused(f"drain mode must be one of {sorted(DRAIN_MODES)}")
        peer.drain = mode
        return res.Done()

    def _peer_stopping(self, cmd: c.PeerStopping, at_ms: int) -> Result:
        peer = self._member(cmd.peer)
        if peer.incarnation != cmd.incarnation:
            raise Refused("peer has restarted since it asked to stop", Rejection.CONFLICT)
        peer.stopping = True
        return res.Done()

    def _peer_leave(self, cmd: c.PeerLeave, at_ms: int) -> Result:
        """Remove a peer for good. A voter may go only if the voters that remain
        and are up still form a majority of the voters that remain, unless
        ``force``: a recovered mesh drops the voters it lost for good, which
        are no longer Raft voters, so no majority depends on them."""
        peer = self._member(cmd.peer)
        refusal = None if cmd.force else leave_refusal(self, peer)
        if refusal is not None:
            raise Refused(refusal, Rejection.CONFLICT)
        requeued = self._requeue_owned_by(peer.id)
        peer.status = PEER_LEFT
        peer.since_ms = at_ms
        peer.stopping = False
        return res.Requeued(requeued)

    def _member(self, peer_id: Any) -> Peer:
        peer = self.peers.get(peer_id) if isinstance(peer_id, str) else None
        if peer is None or peer.status == PEER_LEFT:
            raise Refused(f"no peer {peer_id!r} in this mesh", Rejection.UNKNOWN_PEER)
        return peer

    def _configure(self, cmd: c.Configure, at_ms: int) -> Result:
        caps = _limits(cmd.tenant_caps, "tenant caps")
        default = _limit(cmd.default_tenant_cap, "default tenant cap")
        # Newer keys are optional, so an older proposer's configure still applies.
        max_queued = _limits(cmd.tenant_max_queued or {}, "tenant queued maximums")
        default_max_queued = _limit(cmd.default_tenant_max_queued, "default queued maximum")
        retry = cmd.retry or {}
        unknown = set(retry) - {f.name for f in fields(RetryPolicy)}
        if unknown:
            raise Refused(f"unknown retry settings {sorted(map(str, unknown))}")
        policy = RetryPolicy(**retry)
        _int(policy.backoff_max_ms, "backoff_max_ms", 0, MAX_MS)
        _int(policy.backoff_base_ms, "backoff_base_ms", 0, policy.backoff_max_ms)
        if not (
            isinstance(policy.retry_timeouts, bool) and isinstance(policy.count_lost_owner, bool)
        ):
            raise Refused("retry policy needs 0 <= backoff_base_ms <= backoff_max_ms and booleans")
        aging_ms = _int(cmd.aging_ms, "aging_ms", 0, MAX_MS)
        if not isinstance(cmd.handoff, bool):
            raise Refused("handoff must be a boolean")
        prefetch = _int(cmd.prefetch, "prefetch", 0, MAX_PREFETCH)
        command_ttl_ms = _int(
            cmd.command_ttl_ms, "command_ttl_ms", MIN_COMMAND_TTL_MS, COMMAND_TTL_MS
        )
        self.tenant_caps = caps
        self.default_tenant_cap = default
        self.tenant_max_queued = max_queued
        self.default_tenant_max_queued = default_max_queued
        self.retry = policy
        self.aging_ms = aging_ms
        self.handoff = cmd.handoff
        self.prefetch = prefetch
        self.command_ttl_ms = command_ttl_ms
        return res.Done()

    # -- schedules (consensus/schedules.py) -------------------------------

    def _schedule_set(self, cmd: c.ScheduleSet, at_ms: int) -> Result:
        try:
            check_definition(
                cmd.schedule,
                cmd.cron,
                cmd.every_ms,
                cmd.timezone,
                cmd.agent,
                cmd.tenant,
                cmd.overlap,
                cmd.catchup,
            )
        except ScheduleInvalid as exc:
            raise Refused(str(exc)) from None
        schedule = Schedule(
            id=cmd.schedule,
            cron=cmd.cron,
            every_ms=cmd.every_ms,
            timezone=cmd.timezone,
            agent=cmd.agent,
            input=_plain(cmd.input, "input"),
            tenant=cmd.tenant,
            overlap=cmd.overlap,
            catchup=cmd.catchup,
            created_at_ms=at_ms,
            # Ticks from creation on: none before it is due.
            last_tick_ms=at_ms,
        )
        known = self.schedules.get(schedule.id)
        if known is not None:
            if known.definition() == schedule.definition():
                return res.ScheduleSaved(created=False)
            raise Refused(
                f"schedule {schedule.id} exists with another definition; delete it first",
                Rejection.CONFLICT,
            )
        if len(self.schedules) >= MAX_SCHEDULES:
            raise Refused(f"the mesh already holds {MAX_SCHEDULES} schedules", Rejection.CONFLICT)
        self.schedules[schedule.id] = schedule
        return res.ScheduleSaved(created=True)

    def _schedule_delete(self, cmd: c.ScheduleDelete, at_ms: int) -> Result:
        """Runs already fired go on; only future ticks are gone."""
        del self.schedules[self._schedule(cmd.schedule).id]
        return res.Done()

    def _schedule_pause(self, cmd: c.SchedulePause, at_ms: int) -> Result:
        self._schedule(cmd.schedule).paused = True
        return res.Done()

    def _schedule_resume(self, cmd: c.ScheduleResume, at_ms: int) -> Result:
        schedule = self._schedule(cmd.schedule)
        if schedule.paused:
            schedule.paused = False
            # A pause drops the ticks due meanwhile, whatever the catch-up policy.
            schedule.last_tick_ms = max(schedule.last_tick_ms, at_ms)
        return res.Done()

    def _fire_tick(self, cmd: c.FireTick, at_ms: int) -> Result:
        """Fire (or drop) one tick: only a tick after the last one, so each
        tick fires at most once whoever proposes it and however often. The
        run it starts goes through the submit path, keyed by the tick."""
        schedule = self._schedule(cmd.schedule)
        tick_ms = _int(cmd.tick_ms, "tick_ms", 0, MAX_MS)
        if schedule.paused:
            raise Refused(f"schedule {schedule.id} is paused", Rejection.CONFLICT)
        if tick_ms <= schedule.last_tick_ms:
            raise Refused(
                f"tick {tick_ms} is not after the last tick {schedule.last_tick_ms}",
                Rejection.CONFLICT,
            )
        if tick_ms > at_ms:
            raise Refused(f"tick {tick_ms} is not due at {at_ms}")
        if not cmd.fire:
            return self._skip_tick(schedule, tick_ms, "missed; the catch-up policy drops it")
        previous = self.runs.get(schedule.last_run) if schedule.last_run is not None else None
        if previous is not None and previous.status == RunStatus.SETTLING:
            previous = None  # already ending
        if previous is not None and schedule.overlap == OVERLAP_SKIP:
            return self._skip_tick(schedule, tick_ms, f"run {previous.id} is still active")
        key = tick_key(schedule.id, tick_ms)
        spec = RunSpec(
            agent=schedule.agent,
            input=schedule.input,
            tenant=schedule.tenant,
            idempotency_key=key,
        )
        try:
            outcome = self._submit_one(
                {"id": tick_run_id(schedule.id, tick_ms), **spec.to_wire()}, at_ms
            )
        except Refused as exc:
            return self._skip_tick(schedule, tick_ms, f"its run was refused: {exc}")
        if previous is not None and schedule.overlap == OVERLAP_CANCEL_PREVIOUS:
            self._cancel(c.Cancel(cmd.cid, at_ms, previous.id), at_ms)
        schedule.last_tick_ms = tick_ms
        schedule.last_run = outcome.id
        schedule.fired += 1
        return res.TickFired(run=outcome.id)

    def _skip_tick(self, schedule: Schedule, tick_ms: int, why: str) -> Result:
        schedule.last_tick_ms = tick_ms
        schedule.skipped += 1
        return res.TickFired(run=None, skipped=why)

    def _schedule(self, schedule_id: Any) -> Schedule:
        schedule = self.schedules.get(schedule_id) if isinstance(schedule_id, str) else None
        if schedule is None:
            raise Refused(f"no schedule {schedule_id!r}", Rejection.UNKNOWN_SCHEDULE)
        return schedule

    _handlers: ClassVar[dict[c.Op, Callable[[MeshState, Any, int], res.Result]]] = {
        c.Op.SUBMIT: _submit,
        c.Op.ASSIGN: _assign,
        c.Op.FINISH: _finish,
        c.Op.RELEASE: _release,
        c.Op.PEER_UP: _peer_up,
        c.Op.PEER_DOWN: _peer_down,
        c.Op.CONFIGURE: _configure,
        c.Op.FAIL: _fail,
        c.Op.CANCEL: _cancel,
        c.Op.SETTLE: _settle,
        c.Op.PEER_JOIN: _peer_join,
        c.Op.PEER_DRAIN: _peer_drain,
        c.Op.PEER_STOPPING: _peer_stopping,
        c.Op.PEER_LEAVE: _peer_leave,
        c.Op.SUSPEND: _suspend,
        c.Op.WAKE: _wake,
        c.Op.SIGNAL: _signal,
        c.Op.PAUSE: _pause,
        c.Op.RESUME: _resume,
        c.Op.SCHEDULE_SET: _schedule_set,
        c.Op.SCHEDULE_DELETE: _schedule_delete,
        c.Op.SCHEDULE_PAUSE: _schedule_pause,
        c.Op.SCHEDULE_RESUME: _schedule_resume,
        c.Op.FIRE_TICK: _fire_tick,
    }

    # -- transitions shared by handlers -----------------------------------

    def _index(self, run: Run) -> None:
        """File ``run`` under its status in the derived indexes."""
        status = run.status
        if status == RunStatus.QUEUED:
            self.queue.add(run)
            _count(self.tenant_queued, run.spec.tenant, 1)
        elif status == RunStatus.RUNNING and run.owner is not None:
            self.by_owner.setdefault(run.owner, set()).add(run.id)
            _count(self.tenant_running, run.spec.tenant, 1)
        elif status == RunStatus.WAITING:
            self.waiting_ids.add(run.id)
        elif status == RunStatus.SETTLING:
            self.settling_ids.add(run.id)

    def _unindex(self, run: Run) -> None:
        """Undo ``_index``: before the run's status or owner changes."""
        status = run.status
        if status == RunStatus.QUEUED:
            if run.id in self.queue:
                self.queue.discard(run)
                _count(self.tenant_queued, run.spec.tenant, -1)
        elif status == RunStatus.RUNNING and run.owner is not None:
            owned = self.by_owner.get(run.owner, set())
            if run.id in owned:
                owned.discard(run.id)
                _count(self.tenant_running, run.spec.tenant, -1)
        elif status == RunStatus.WAITING:
            self.waiting_ids.discard(run.id)
        elif status == RunStatus.SETTLING:
            self.settling_ids.discard(run.id)

    def _move(self, run: Run, status: RunStatus) -> None:
        """Every status change of a kept run goes through here (or through
        ``_assign``), so the indexes never disagree with the runs."""
        self._unindex(run)
        run.status = status
        self._index(run)

    def _requeue(self, run: Run) -> None:
        """Back to the queue; the epoch stays, so the next owner gets epoch + 1."""
        self._move(run, RunStatus.QUEUED)
        run.owner = None
        run.assigned_at_ms = None

    def _requeue_or_pause(self, run: Run) -> None:
        """Back to the queue, or PAUSED if an operator asked for a pause."""
        if run.pause_requested:
            self._park(run, RunStatus.PAUSED)
        else:
            self._requeue(run)

    def _park(self, run: Run, status: RunStatus) -> None:
        """WAITING or PAUSED: no owner, no slot, not queue depth; the epoch
        stays, so the next owner gets epoch + 1."""
        self._move(run, status)
        run.owner = None
        run.assigned_at_ms = None
        if status == RunStatus.PAUSED:
            run.pause_requested = False

    def _requeue_owned_by(self, peer_id: str) -> int:
        """The owner is gone: its runs go back to the queue (failover), unless
        cancelled meanwhile or out of attempts when lost owners count."""
        owned = sorted(self.by_owner.get(peer_id, set()))
        for run_id in owned:
            run = self.runs[run_id]
            run.losses += 1
            if run.cancel_requested:
                self._settle_as(run, RunStatus.CANCELLED)
            elif self.retry.count_lost_owner and self.retry.used(run) >= run.spec.max_attempts:
                run.last_error = f"owner lost {run.losses} times"
                self._settle_as(run, RunStatus.FAILED)
            else:
                self._requeue_or_pause(run)
        return len(owned)

    def _settle_as(self, run: Run, outcome: RunStatus) -> None:
        self._move(run, RunStatus.SETTLING)
        run.outcome = outcome
        run.owner = None
        run.assigned_at_ms = None
        run.waiting_for = None
        run.pause_requested = False

    def _evict(self, run: Run) -> None:
        self._unindex(run)
        del self.runs[run.id]

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
        return [self.runs[i] for i in sorted(self.settling_ids)]

    def cancelling(self, peer_id: str) -> list[Run]:
        return [r for r in self.owned_by(peer_id) if r.cancel_requested]

    def queued(self) -> list[Run]:
        """Queued runs in scheduling order: priority first, then age (see
        ``RunQueue``; iterate ``queue`` to read only the first few)."""
        return list(self.queue)

    def waiting_runs(self) -> list[Run]:
        return [self.runs[i] for i in sorted(self.waiting_ids)]

    def owned_by(self, peer_id: str) -> list[Run]:
        """In assignment order (then id): the order a peer starts the runs it
        holds ready beyond its slots."""
        runs = [self.runs[i] for i in self.by_owner.get(peer_id, ())]
        runs.sort(key=_assignment_order)
        return runs

    def peer_by_raft(self, raft_addr: str) -> Peer | None:
        for peer in self.peers.values():
            if peer.raft == raft_addr:
                return peer
        return None

    # -- snapshots --------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            # v2: remembered results are typed (results.to_wire), no longer maps;
            # v3: a run's spec is one map (Run.public);
            # v4: runs carry waiting_for, signals, pause_requested;
            # v5: the queue's aging and the finish handoff are replicated;
            # v6: and the prefetch; v7: and how long command ids are kept.
            "v": 7,
            "runs": [r.public() for r in self.runs.values()],
            "peers": [p.public() for p in self.peers.values()],
            "idempotency": [[list(k), v[0], v[1]] for k, v in self.idempotency.items()],
            "seen": [[k, res.to_wire(v[0]), v[1]] for k, v in self.seen.items()],
            "tenant_caps": self.tenant_caps,
            "default_tenant_cap": self.default_tenant_cap,
            "tenant_max_queued": self.tenant_max_queued,
            "default_tenant_max_queued": self.default_tenant_max_queued,
            "retry": dict(self.retry.__dict__),
            "aging_ms": self.aging_ms,
            "handoff": self.handoff,
            "prefetch": self.prefetch,
            "command_ttl_ms": self.command_ttl_ms,
            "schedules": [s.public() for s in self.schedules.values()],
            "applied": self.applied,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeshState:
        state = cls()
        state.runs = {r["id"]: Run.from_public(r) for r in data["runs"]}
        state.peers = {p["id"]: Peer(**p) for p in data["peers"]}
        state.idempotency = {
            # a key from before tenants scoped them was the default tenant's
            (tuple(k) if isinstance(k, list | tuple) else ("default", k)): (run_id, exp)
            for k, run_id, exp in data["idempotency"]
        }
        read = res.from_wire if data.get("v", 1) >= 2 else res.from_legacy
        state.seen = {k: (read(result), exp) for k, result, exp in data["seen"]}
        state.tenant_caps = dict(data["tenant_caps"])
        state.default_tenant_cap = data["default_tenant_cap"]
        state.tenant_max_queued = dict(data.get("tenant_max_queued") or {})
        state.default_tenant_max_queued = data.get("default_tenant_max_queued")
        state.retry = RetryPolicy(**(data.get("retry") or {}))
        state.aging_ms = data.get("aging_ms", 0)
        state.handoff = data.get("handoff", False)
        state.prefetch = data.get("prefetch", 0)
        state.command_ttl_ms = data.get("command_ttl_ms", COMMAND_TTL_MS)
        # Snapshots from before schedules have none.
        state.schedules = {s["id"]: Schedule.from_public(s) for s in data.get("schedules") or []}
        state.applied = data["applied"]
        for run in state.runs.values():
            state._index(run)
        return state


def leave_refusal(state: MeshState, peer: Peer) -> str | None:
    """Why ``peer_leave`` of this member would be refused, or None: a voter may
    go only if the voters that remain and are up still form a majority of the
    voters that remain. A query, so the API can ask before it touches Raft."""
    if peer.role != VOTER:
        return None
    remaining = [
        p
        for p in state.peers.values()
        if p.role == VOTER and p.status != PEER_LEFT and p.id != peer.id
    ]
    up = [p for p in remaining if p.status == PEER_UP]
    if not remaining:
        return f"{peer.id} is the last voter: the mesh cannot lose it"
    if len(up) <= len(remaining) / 2:
        return (
            f"removing voter {peer.id} would leave {len(remaining)} voters of which only "
            f"{len(up)} are up: they could not form a majority; bring voters back first"
        )
    return None


def _assignment_order(run: Run) -> tuple[int, str]:
    return run.assigned_at_ms or 0, run.id


def _spec_id(spec: Any) -> str | None:
    """The id to answer a refused run spec with: only text is echoed back."""
    run_id = spec.get("id") if isinstance(spec, dict) else None
    return run_id if isinstance(run_id, str) else None


def _limit(value: Any, what: str) -> int | None:
    return None if value is None else _int(value, what, 0)


def _limits(values: Any, what: str) -> dict[str, int]:
    if not isinstance(values, dict):
        raise Refused(f"{what} must map tenants to non-negative integers")
    return {str(k): _int(v, what, 0) for k, v in values.items()}


_Key = TypeVar("_Key")


def _count(counts: dict[str, int], key: str, delta: int) -> None:
    left = counts.get(key, 0) + delta
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _expire_oldest(table: dict[_Key, tuple[Any, int]], now_ms: int) -> None:
    """Drop the entries of ``table``, oldest first, whose expiry (the tuple's
    second item) has passed."""
    while table:
        key = next(iter(table))
        if table[key][1] > now_ms:
            break
        del table[key]
