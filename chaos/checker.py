"""The checker: the ten invariants of DESIGN.md judged against what really happened.

Pure: it reads a History (what clients saw), the side-effect ledger (what the
agents executed) and a StorageSnapshot (what was recorded), and returns a
Verdict. Every failed invariant comes with counter-examples naming runs,
epochs, peers and times, so a violation can be traced in the peer logs.

Stale writes (invariant 2) and repeated steps (invariant 4) are judged without
trusting any peer's view of ownership:

* the ledger's ``attempt_start`` of epoch E is written after E's claim
  committed in storage, so any step, event or result of an older epoch stamped
  later than that was written after it should have been fenced;
* a step checkpointed by epoch e was committed before any claim by a newer
  epoch (the claim and the write lock the same row), so a newer epoch that
  executes that step again repeated a checkpointed step.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from raftmesh.chaos.history import (
    FAIL,
    INFO,
    OK,
    SIGNAL_NAME,
    Fault,
    History,
    ScheduleRecord,
    SignalOp,
    StorageSnapshot,
    StoredSignal,
)
from raftmesh.chaos.ledger import (
    ATTEMPT_END,
    ATTEMPT_START,
    ATTEMPT_SUSPEND,
    STEP_START,
    LedgerEntry,
)
from raftmesh.consensus.schedules import CATCHUP_ALL, tick_key
from raftmesh.consensus.status import TERMINAL_STATUSES, RunStatus

MAX_EXAMPLES = 10

NAMES = {
    1: "acknowledged submissions are never lost",
    2: "only the current epoch writes",
    3: "one terminal state per run, result written once",
    4: "no checkpointed step repeats",
    5: "one idempotency key, one run",
    6: "caps hold (peer slots, tenant in-flight caps)",
    7: "dead owners' runs resume within the bound",
    8: "acknowledged signals delivered once, in order",
    9: "schedule ticks fired at most once, and at least once",
    10: "waiting and paused runs hold no slot and no owner",
}
# Invariant 9 owes no tick this close to the schedule's deletion (or the end).
TICK_MARGIN_TICKS = 2
# Under a catch-up policy that drops late ticks, a tick is excused when a
# fault was in force from this long before it to this long after it.
TICK_EXCUSE_BEFORE_MS = 1_000
TICK_EXCUSE_AFTER_MS = 10_000


@dataclass
class InvariantResult:
    number: int
    name: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class Failover:
    run_id: str
    peer: str
    lost_ms: int
    resumed_ms: int | None
    new_peer: str | None
    fault: str
    overlapped: bool  # another fault was active meanwhile; not held to the bound

    @property
    def duration_ms(self) -> int | None:
        return None if self.resumed_ms is None else self.resumed_ms - self.lost_ms


@dataclass(frozen=True)
class Window:
    start_ms: int
    end_ms: int

    @property
    def duration_ms(self) -> int:
        return self.end_ms - self.start_ms


@dataclass(frozen=True)
class WaitFigures:
    """How much of the run waited: what invariants 8 to 10 had to judge."""

    sleepers: int = 0
    signal_runs: int = 0
    parents: int = 0
    children: int = 0
    signal_attempts: int = 0
    signals_acked: int = 0
    signals_resent: int = 0
    signals_delivered: int = 0
    ticks_owed: int = 0
    ticks_fired: int = 0
    pauses_acked: int = 0
    parked_seen: int = 0
    paused_seen: int = 0


@dataclass
class Verdict:
    invariants: list[InvariantResult]
    failovers: list[Failover]
    outages: list[Window]
    acknowledged: int
    completed: int
    attempts: int
    waits: WaitFigures = field(default_factory=WaitFigures)

    @property
    def passed(self) -> bool:
        return all(i.passed for i in self.invariants)

    def failover_percentiles(self) -> dict[str, float]:
        return percentiles([f.duration_ms for f in self.failovers if f.duration_ms is not None])


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """Nearest-rank p50/p95/p99/max (ms); empty input gives an empty dict."""
    data = sorted(values)
    if not data:
        return {}

    def rank(p: float) -> float:
        return data[max(0, math.ceil(p / 100 * len(data)) - 1)]

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": data[-1], "n": len(data)}


def check(
    history: History,
    ledger: list[LedgerEntry],
    storage: StorageSnapshot,
    *,
    failover_bound_ms: int = 10_000,
    outage_min_ms: int = 1_000,
) -> Verdict:
    acked = _acknowledged(history)
    failovers = measure_failovers(history, ledger, storage)
    invariants = [
        _check_lost(history, storage, acked),
        _check_stale_writes(ledger, storage),
        _check_single_outcome(history, storage),
        _check_repeated_steps(ledger, storage),
        _check_idempotency(history, storage),
        _check_caps(history),
        _check_failovers(failovers, failover_bound_ms),
        check_signals(history, storage),
        check_ticks(history, storage),
        check_parked(history),
    ]
    completed = sum(
        1
        for run_id in set(acked.values())
        if _final_status(run_id, history, storage) in TERMINAL_STATUSES
    )
    return Verdict(
        invariants=invariants,
        failovers=failovers,
        outages=submission_outages(history, outage_min_ms),
        acknowledged=len(set(acked.values())),
        completed=completed,
        attempts=len(history.submits),
        waits=wait_figures(history, storage),
    )


def _acknowledged(history: History) -> dict[str, str]:
    """Idempotency key -> run id of its first acknowledgement."""
    acked: dict[str, str] = {}
    for op in sorted(history.submits, key=lambda o: o.end_ms):
        if op.outcome == OK and op.run_id is not None:
            acked.setdefault(op.key, op.run_id)
    return acked


def _final_status(run_id: str, history: History, storage: StorageSnapshot) -> str | None:
    stored = storage.runs.get(run_id)
    if stored is not None and stored.status in TERMINAL_STATUSES:
        return stored.status
    seen = [o for o in history.observations if o.run_id == run_id]
    return max(seen, key=lambda o: o.at_ms).status if seen else None


def _check_lost(
    history: History, storage: StorageSnapshot, acked: dict[str, str]
) -> InvariantResult:
    result = InvariantResult(1, NAMES[1], checked=len(acked))
    for key, run_id in sorted(acked.items()):
        status = _final_status(run_id, history, storage)
        if status not in TERMINAL_STATUSES:
            where = "never seen in storage" if run_id not in storage.runs else f"last {status}"
            result.violations.append(
                f"key {key}: run {run_id} was acknowledged but is not terminal at the end ({where})"
            )
    return result


def _attempt_starts(ledger: list[LedgerEntry]) -> dict[str, dict[int, int]]:
    """run -> epoch -> first attempt_start (ms)."""
    starts: dict[str, dict[int, int]] = defaultdict(dict)
    for e in ledger:
        if e.kind == ATTEMPT_START:
            prev = starts[e.run_id].get(e.epoch)
            starts[e.run_id][e.epoch] = e.at_ms if prev is None else min(prev, e.at_ms)
    return starts


def _newer_started_before(starts: dict[int, int], epoch: int, at_ms: int) -> tuple[int, int] | None:
    newer = [(e, t) for e, t in starts.items() if e > epoch and t < at_ms]
    return min(newer, key=lambda et: et[1]) if newer else None


def _check_stale_writes(ledger: list[LedgerEntry], storage: StorageSnapshot) -> InvariantResult:
    starts = _attempt_starts(ledger)
    writes = len(storage.steps) + len(storage.events) + len(storage.runs)
    result = InvariantResult(2, NAMES[2], checked=writes)
    for kind, items in (("step", storage.steps), ("event", storage.events)):
        for w in items:
            newer = _newer_started_before(starts.get(w.run_id, {}), w.epoch, w.at_ms)
            if newer is not None:
                result.violations.append(
                    f"run {w.run_id}: {kind} {w.seq} written by stale epoch {w.epoch}"
                    f"{' on ' + w.peer if w.peer else ''} at {w.at_ms}, "
                    f"{w.at_ms - newer[1]} ms after epoch {newer[0]} had claimed the run"
                )
    by_run: dict[str, list] = defaultdict(list)
    for ev in storage.events:
        by_run[ev.run_id].append(ev)
    for run_id, events in by_run.items():
        highest = 0
        for ev in sorted(events, key=lambda w: w.seq):
            if ev.epoch < highest:
                result.violations.append(
                    f"run {run_id}: event {ev.seq} carries epoch {ev.epoch} after an event of "
                    f"epoch {highest} (storage order)"
                )
            highest = max(highest, ev.epoch)
    for run in storage.runs.values():
        if run.result_epoch is None or run.finished_at_ms is None:
            continue
        newer = _newer_started_before(starts.get(run.id, {}), run.result_epoch, run.finished_at_ms)
        if newer is not None:
            result.violations.append(
                f"run {run.id}: result of stale epoch {run.result_epoch} stored at "
                f"{run.finished_at_ms}, after epoch {newer[0]} had claimed the run"
            )
    return result


def _check_single_outcome(history: History, storage: StorageSnapshot) -> InvariantResult:
    outcomes: dict[str, dict[tuple[str, str | None], list[str]]] = defaultdict(dict)
    for o in history.observations:
        if o.status in TERMINAL_STATUSES:
            outcomes[o.run_id].setdefault((o.status, o.result), []).append(f"{o.source}@{o.at_ms}")
    for run in storage.runs.values():
        if run.status in TERMINAL_STATUSES:
            outcomes[run.id].setdefault((run.status, run.result), []).append("storage at end")
    result = InvariantResult(3, NAMES[3], checked=len(outcomes))
    for run_id, seen in sorted(outcomes.items()):
        if len(seen) > 1:
            shown = "; ".join(
                f"{status} {res or ''} seen by {', '.join(who[:3])}"
                for (status, res), who in seen.items()
            )
            result.violations.append(f"run {run_id} has {len(seen)} terminal outcomes: {shown}")
    return result


def _check_repeated_steps(ledger: list[LedgerEntry], storage: StorageSnapshot) -> InvariantResult:
    checkpoint = {(w.run_id, w.seq): w for w in storage.steps}
    executions: dict[tuple[str, int], list[LedgerEntry]] = defaultdict(list)
    for e in ledger:
        if e.kind == STEP_START:
            executions[(e.run_id, e.seq)].append(e)
    result = InvariantResult(4, NAMES[4], checked=len(executions))
    for (run_id, seq), runs in sorted(executions.items()):
        per_epoch: dict[int, int] = defaultdict(int)
        for e in runs:
            per_epoch[e.epoch] += 1
        for epoch, count in per_epoch.items():
            if count > 1:
                result.violations.append(
                    f"run {run_id}: step {seq} executed {count} times by epoch {epoch}"
                )
        stored = checkpoint.get((run_id, seq))
        if stored is None:
            continue
        for e in runs:
            if e.epoch > stored.epoch:
                result.violations.append(
                    f"run {run_id}: step {seq} checkpointed by epoch {stored.epoch} at "
                    f"{stored.at_ms} executed again by epoch {e.epoch} on {e.peer} at {e.at_ms}"
                )
    return result


def _check_idempotency(history: History, storage: StorageSnapshot) -> InvariantResult:
    ids: dict[str, set[str]] = defaultdict(set)
    for op in history.submits:
        if op.outcome == OK and op.run_id is not None:
            ids[op.key].add(op.run_id)
    stored: dict[str, set[str]] = defaultdict(set)
    for run in storage.runs.values():
        if run.idempotency_key is not None:
            stored[run.idempotency_key].add(run.id)
    keys = set(ids) | set(stored)
    result = InvariantResult(5, NAMES[5], checked=len(keys))
    for key in sorted(keys):
        acked, rows = ids.get(key, set()), stored.get(key, set())
        if len(acked) > 1:
            result.violations.append(f"key {key} acknowledged as runs {sorted(acked)}")
        if len(rows) > 1:
            result.violations.append(f"key {key} has {len(rows)} runs in storage: {sorted(rows)}")
        if acked and rows and not acked <= rows:
            result.violations.append(
                f"key {key}: acknowledged {sorted(acked)} but storage holds {sorted(rows)}"
            )
    return result


def _check_caps(history: History) -> InvariantResult:
    result = InvariantResult(6, NAMES[6], checked=len(history.samples))
    tenant_samples = 0
    for s in history.samples:
        for p in s.peers:
            held = p.slots if p.capacity is None else p.capacity
            if p.running > held:
                result.violations.append(
                    f"at {s.at_ms} ({s.source}'s view): {p.id} runs {p.running} > {p.slots} slots"
                    + (f" + {held - p.slots} prefetch" if held != p.slots else "")
                )
        for tenant, (running, cap) in s.tenants.items():
            tenant_samples += 1
            if running > cap:
                result.violations.append(
                    f"at {s.at_ms} ({s.source}'s view): tenant {tenant} runs {running} > cap {cap}"
                )
    if not tenant_samples:
        result.note = "the API exposes no tenant caps, so only peer slots were checked"
    return result


def measure_failovers(
    history: History, ledger: list[LedgerEntry], storage: StorageSnapshot
) -> list[Failover]:
    """For every peer a fault took away, each run it was executing then: how long
    until an attempt of a newer epoch started (the agent resumed elsewhere).

    A run already finished by then lost nothing, even if its last attempt left
    no end record (it raised, or stored a result and then died)."""
    attempts: dict[str, list[LedgerEntry]] = defaultdict(list)
    ended_at: dict[tuple[str, int], int] = {}
    for e in ledger:
        if e.kind == ATTEMPT_START:
            attempts[e.run_id].append(e)
        elif e.kind in (ATTEMPT_END, ATTEMPT_SUSPEND):
            # A suspended attempt left its owner on purpose: losing that
            # peer afterwards costs the run nothing.
            ended_at[(e.run_id, e.epoch)] = e.at_ms
    failovers: list[Failover] = []
    for fault in history.faults:
        for peer in fault.lost:
            t0 = fault.start_ms
            for run_id, starts in attempts.items():
                before = [a for a in starts if a.at_ms <= t0]
                if not before:
                    continue
                current = max(before, key=lambda a: (a.epoch, a.at_ms))
                end = ended_at.get((run_id, current.epoch))
                if current.peer != peer or (end is not None and end <= t0):
                    continue
                stored = storage.runs.get(run_id)
                finished_ms = stored.finished_at_ms if stored is not None else None
                if finished_ms is not None and finished_ms <= t0:
                    continue
                later = [a for a in starts if a.epoch > current.epoch and a.at_ms > t0]
                if not later and (end is not None or finished_ms is not None):
                    # The owner came back in time and finished the attempt
                    # itself, or its outcome (e.g. a timeout) was already
                    # stored and a newer epoch only had to report it.
                    continue
                nxt = min(later, key=lambda a: a.at_ms) if later else None
                until = nxt.at_ms if nxt else history.end_ms
                overlapped = any(
                    other is not fault and other.start_ms < until and other.end_ms > t0
                    for other in history.faults
                )
                failovers.append(
                    Failover(
                        run_id=run_id,
                        peer=peer,
                        lost_ms=t0,
                        resumed_ms=nxt.at_ms if nxt else None,
                        new_peer=nxt.peer if nxt else None,
                        fault=f"{fault.kind} ({fault.detail})",
                        overlapped=overlapped,
                    )
                )
    return failovers


def _check_failovers(failovers: list[Failover], bound_ms: int) -> InvariantResult:
    held = [f for f in failovers if not f.overlapped]
    result = InvariantResult(7, NAMES[7], checked=len(held))
    for f in held:
        if f.duration_ms is None:
            result.violations.append(
                f"run {f.run_id} lost its owner {f.peer} at {f.lost_ms} ({f.fault}) and never resumed"
            )
        elif f.duration_ms > bound_ms:
            result.violations.append(
                f"run {f.run_id} lost its owner {f.peer} at {f.lost_ms} ({f.fault}); resumed on "
                f"{f.new_peer} after {f.duration_ms} ms > {bound_ms} ms"
            )
    skipped = len(failovers) - len(held)
    result.note = f"bound {bound_ms} ms" + (
        f"; {skipped} failovers overlapped another fault and were measured but not held to it"
        if skipped
        else ""
    )
    return result


def submission_outages(history: History, min_ms: int) -> list[Window]:
    """Stretches in which no submission was acknowledged although clients were trying:
    from the last acknowledgement before a failed attempt to the next one."""
    ops = sorted(history.submits, key=lambda o: o.end_ms)
    windows: list[Window] = []
    last_ok = history.start_ms
    failing = False
    for op in ops:
        if op.outcome in (FAIL, INFO):
            failing = True
        elif op.outcome == OK:
            if failing and op.end_ms - last_ok >= min_ms:
                windows.append(Window(last_ok, op.end_ms))
            failing = False
            last_ok = op.end_ms
    if failing and history.end_ms - last_ok >= min_ms:
        windows.append(Window(last_ok, history.end_ms))
    return windows


def _acked_signals(history: History) -> list[tuple[SignalOp, int]]:
    """Every acknowledged signal attempt with the seq its 202 answered."""
    return [(op, op.seq) for op in history.signals if op.outcome == OK and op.seq is not None]


def check_signals(history: History, storage: StorageSnapshot) -> InvariantResult:
    """Invariant 8. An acknowledged signal is stored under the seq it was
    acknowledged with, one key one seq; the run's journaled waits consume
    the stored signals of a name in seq order (the i-th wait takes seq i),
    each once; and a run that succeeded consumed every acknowledged one and
    returned exactly what it consumed."""
    acked = _acked_signals(history)
    result = InvariantResult(8, NAMES[8], checked=len(acked))
    stored = {(s.run_id, s.name, s.seq): s for s in storage.signals}
    delivered: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    for d in storage.deliveries:
        if d.data is not None:  # a wait that timed out consumed nothing
            delivered[(d.run_id, d.name)][d.index] = d.data
    result.violations += _stored_once(acked, storage, stored)
    result.violations += _consumed_in_order(delivered, stored)
    result.violations += _consumed_by_success(acked, storage, delivered)
    return result


def _stored_once(
    acked: list[tuple[SignalOp, int]],
    storage: StorageSnapshot,
    stored: dict[tuple[str, str, int], StoredSignal],
) -> list[str]:
    """One key, one stored signal, under the seq every acknowledgement named."""
    violations = []
    stored_seqs: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for s in storage.signals:
        if s.key is not None:
            stored_seqs[(s.run_id, s.name, s.key)].append(s.seq)
    acked_seqs: dict[tuple[str, str, str], set[int]] = defaultdict(set)
    for op, seq in acked:
        acked_seqs[(op.run_id, op.name, op.key)].add(seq)
    for (run_id, name, key), seqs in sorted(stored_seqs.items()):
        if len(seqs) > 1:
            violations.append(
                f"run {run_id}: signal {name} key {key} stored {len(seqs)} times"
                f" (seqs {sorted(seqs)})"
            )
    for (run_id, name, key), found in sorted(acked_seqs.items()):
        if len(found) > 1:
            violations.append(
                f"run {run_id}: signal {name} key {key} acknowledged under seqs {sorted(found)}"
            )
    for op, seq in acked:
        row = stored.get((op.run_id, op.name, seq))
        if row is None or row.key != op.key:
            where = "missing" if row is None else f"holds key {row.key}"
            violations.append(
                f"run {op.run_id}: signal {op.name} key {op.key} acknowledged as seq {seq} "
                f"at {op.end_ms}, but storage's seq {seq} is {where}"
            )
    return violations


def _consumed_in_order(
    delivered: dict[tuple[str, str], dict[int, str]],
    stored: dict[tuple[str, str, int], StoredSignal],
) -> list[str]:
    """The i-th wait for a name consumed the signal stored as seq i, and no
    key twice."""
    violations = []
    for (run_id, name), by_index in sorted(delivered.items()):
        seen: dict[str, int] = {}
        for index, data in sorted(by_index.items()):
            row = stored.get((run_id, name, index))
            if row is None or row.data != data:
                violations.append(
                    f"run {run_id}: wait {index} for {name} consumed {data}, but the signal "
                    f"stored as seq {index} is {row.data if row else 'missing'} (out of order)"
                )
            if row is None or row.key is None:
                continue
            if row.key in seen:
                violations.append(
                    f"run {run_id}: signal {name} key {row.key} consumed twice "
                    f"(waits {seen[row.key]} and {index})"
                )
            seen.setdefault(row.key, index)
    return violations


def _consumed_by_success(
    acked: list[tuple[SignalOp, int]],
    storage: StorageSnapshot,
    delivered: dict[tuple[str, str], dict[int, str]],
) -> list[str]:
    """A run that succeeded consumed every signal acknowledged to it, and
    returned (chaos_signal does) what its journal consumed."""
    violations = []
    for op, seq in {(o.run_id, o.name, o.key): (o, q) for o, q in acked}.values():
        run = storage.runs.get(op.run_id)
        if run is None or run.status != RunStatus.SUCCEEDED:
            continue
        if seq not in delivered.get((op.run_id, op.name), {}):
            violations.append(
                f"run {op.run_id} succeeded without consuming signal {op.name} key {op.key} "
                f"(acknowledged as seq {seq} at {op.end_ms})"
            )
    for run in storage.runs.values():
        returned = _returned_signals(run.result)
        if run.status != RunStatus.SUCCEEDED or returned is None:
            continue
        journal = [data for _, data in sorted(delivered.get((run.id, SIGNAL_NAME), {}).items())]
        if returned != journal:
            violations.append(
                f"run {run.id} returned the signals {returned}, but its journal consumed {journal}"
            )
    return violations


def _returned_signals(result: str | None) -> list[str] | None:
    """The canonical data of the signals a chaos_signal run returned, if it did."""
    if result is None:
        return None
    value = json.loads(result)
    if not isinstance(value, dict) or not isinstance(value.get("signals"), list):
        return None
    return [json.dumps(v, sort_keys=True, separators=(",", ":")) for v in value["signals"]]


def _tick_of(key: str | None, schedule_id: str) -> int | None:
    """The tick whose run carries idempotency key ``key``, if it is one of the schedule's."""
    tail = (key or "").rpartition(":")[2]
    if not tail.isdigit():
        return None
    tick = int(tail)
    return tick if tick_key(schedule_id, tick) == key else None


def check_ticks(history: History, storage: StorageSnapshot) -> InvariantResult:
    """Invariant 9. At most once: one run per tick key, on the schedule's
    period, after its creation. At least once: every tick from creation to
    a couple of ticks before its deletion (or the end) has its run, except,
    under a catch-up policy that drops late ticks, one a fault overlapped."""
    result = InvariantResult(9, NAMES[9])
    for record in history.schedules:
        runs: dict[int, list[str]] = defaultdict(list)
        for run in storage.runs.values():
            tick = _tick_of(run.idempotency_key, record.id)
            if tick is not None:
                runs[tick].append(run.id)
        for tick, ids in sorted(runs.items()):
            if len(ids) > 1:
                result.violations.append(
                    f"schedule {record.id}: tick {tick} fired {len(ids)} runs {sorted(ids)}"
                )
            if tick % record.every_ms or tick <= record.created_ms:
                result.violations.append(
                    f"schedule {record.id}: tick {tick} fired, but its ticks fall every "
                    f"{record.every_ms} ms after {record.created_ms}"
                )
        owed = owed_ticks(record, history.end_ms)
        result.checked += len(owed)
        for tick in owed:
            if tick in runs:
                continue
            if record.catchup != CATCHUP_ALL and _excused(tick, history.faults):
                continue
            result.violations.append(
                f"schedule {record.id}: tick {tick} ({record.catchup} catch-up) never fired"
            )
    if not history.schedules:
        result.note = "no schedule in this run"
    return result


def owed_ticks(record: ScheduleRecord, end_ms: int) -> list[int]:
    """The ticks the schedule must have fired by the time it was deleted (or the run ended)."""
    until = (record.deleted_ms or end_ms) - TICK_MARGIN_TICKS * record.every_ms
    first = (record.created_ms // record.every_ms + 1) * record.every_ms
    return list(range(first, until + 1, record.every_ms))


def _excused(tick: int, faults: list[Fault]) -> bool:
    return any(
        f.start_ms - TICK_EXCUSE_BEFORE_MS <= tick <= f.end_ms + TICK_EXCUSE_AFTER_MS
        for f in faults
    )


def check_parked(history: History) -> InvariantResult:
    """Invariant 10, in every sample of a peer's committed state: a waiting
    or paused run it lists has no owner, and its peers hold no more slots
    than it has running runs (a parked run still counted would show there)."""
    result = InvariantResult(10, NAMES[10])
    unlisted = sum(1 for s in history.samples if s.parked is None)
    if unlisted:
        result.note = (
            f"{unlisted} of {len(history.samples)} samples could not list the parked runs;"
            " only their slots were checked"
        )
    for s in history.samples:
        if s.runs:
            result.checked += 1
            held = sum(p.running for p in s.peers)
            running = s.runs.get(RunStatus.RUNNING, 0)
            if held > running:
                result.violations.append(
                    f"at {s.at_ms} ({s.source}'s view): peers hold {held} slots, but only "
                    f"{running} runs are running ({s.runs})"
                )
        for run in s.parked or ():
            result.checked += 1
            if run.owner is not None:
                result.violations.append(
                    f"at {s.at_ms} ({s.source}'s view): {run.status} run {run.id} "
                    f"has owner {run.owner}"
                )
    return result


def wait_figures(history: History, storage: StorageSnapshot) -> WaitFigures:
    agents: dict[str, int] = defaultdict(int)
    for run in storage.runs.values():
        agents[run.agent or ""] += 1
    acked = _acked_signals(history)
    return WaitFigures(
        sleepers=agents["chaos_sleep"],
        signal_runs=agents["chaos_signal"],
        parents=agents["chaos_parent"],
        children=sum(1 for r in storage.runs.values() if r.parent_id is not None),
        signal_attempts=len(history.signals),
        signals_acked=len({(o.run_id, o.name, o.key) for o, _ in acked}),
        signals_resent=sum(1 for o, _ in acked if o.deliberate),
        signals_delivered=sum(1 for d in storage.deliveries if d.data is not None),
        ticks_owed=sum(len(owed_ticks(r, history.end_ms)) for r in history.schedules),
        ticks_fired=sum(
            1
            for record in history.schedules
            for run in storage.runs.values()
            if _tick_of(run.idempotency_key, record.id) is not None
        ),
        pauses_acked=sum(1 for p in history.pauses if p.action == "pause" and p.outcome == OK),
        parked_seen=len({r.id for s in history.samples for r in s.parked or ()}),
        paused_seen=len(
            {r.id for s in history.samples for r in s.parked or () if r.status == "paused"}
        ),
    )
