"""The verdict for humans: a text summary and a PNG timeline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from raftmesh.chaos.checker import MAX_EXAMPLES, Verdict, percentiles
from raftmesh.chaos.history import OK, History, StorageSnapshot

FAILOVER_TARGET_MS = 3000

_FAULT_COLOURS = {
    "kill": "#e4572e",
    "leader": "#a4243b",
    "pause": "#f3a712",
    "partition": "#29335c",
    "db": "#669bbc",
    "restart": "#8c5383",
    "member": "#4c956c",
}


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value / 1000:.2f} s"


def text_report(
    verdict: Verdict, history: History, storage: StorageSnapshot, header: list[str]
) -> str:
    t0 = history.start_ms
    lines = ["raftmesh chaos report", "=" * 21, *header, ""]
    statuses = Counter(r.status for r in storage.runs.values())
    lines += [
        "workload",
        f"  runs acknowledged:     {verdict.acknowledged}",
        f"  runs completed:        {verdict.completed}  ({dict(sorted(statuses.items()))} in storage)",
        f"  submission attempts:   {verdict.attempts}"
        f" ({sum(1 for s in history.submits if s.outcome == OK)} acknowledged,"
        f" {sum(1 for s in history.submits if s.outcome != OK)} failed or indeterminate)",
    ]
    # The chaos agent never fails on its own: a failed run failed because of
    # the infrastructure. Terminal, so not a violation, but worth seeing.
    failed = [r for r in storage.runs.values() if r.status == "failed"]
    if failed:
        errors = Counter((r.error or "")[:120] for r in failed)
        lines.append(f"  failed by the infrastructure (the agent never fails): {len(failed)}")
        lines += [f"    {n} x {err}" for err, n in errors.most_common(3)]
    timed_out = statuses.get("timed_out", 0)
    if timed_out:
        lines.append(
            f"  timed out: {timed_out} (expected: the workload gives some runs a timeout"
            " shorter than their work)"
        )
    waits = verdict.waits
    lines += [
        "",
        "waits (runs that leave their slot and come back)",
        f"  sleepers {waits.sleepers}, signal runs {waits.signal_runs},"
        f" parents {waits.parents} with {waits.children} children",
        f"  signals acknowledged:  {waits.signals_acked}"
        f" ({waits.signals_resent} sent again on purpose, {waits.signal_attempts} attempts);"
        f" consumed by waits: {waits.signals_delivered}",
        f"  schedule ticks:        {waits.ticks_fired} fired, {waits.ticks_owed} owed",
        f"  pauses acknowledged:   {waits.pauses_acked}",
        f"  parked runs sampled:   {waits.parked_seen} distinct waiting or paused runs"
        f" ({waits.paused_seen} paused)",
    ]
    lines += ["", f"faults ({len(history.faults)})"]
    for f in history.faults:
        lines.append(
            f"  {(f.start_ms - t0) / 1000:7.1f}s-{(f.end_ms - t0) / 1000:6.1f}s  {f.kind:<9} {f.detail}"
            + (f"  [owners lost: {', '.join(f.lost)}]" if f.lost else "")
        )
    kinds = Counter(f.kind for f in history.faults)
    lines += [f"  by kind: {dict(sorted(kinds.items()))}", "", "invariants"]
    for inv in verdict.invariants:
        mark = "PASS" if inv.passed else "FAIL"
        lines.append(f"  {mark}  {inv.number}. {inv.name}  (checked {inv.checked})")
        if inv.note:
            lines.append(f"        note: {inv.note}")
        for example in inv.violations[:MAX_EXAMPLES]:
            lines.append(f"        - {example}")
        if len(inv.violations) > MAX_EXAMPLES:
            lines.append(f"        ... and {len(inv.violations) - MAX_EXAMPLES} more")
    pct = verdict.failover_percentiles()
    durations = [f.duration_ms for f in verdict.failovers if f.duration_ms is not None]
    over = sum(1 for d in durations if d > FAILOVER_TARGET_MS)
    lines += [
        "",
        "failover (owner lost -> the run's agent resumes under a newer epoch)",
        f"  measured: {len(durations)} of {len(verdict.failovers)} runs that lost their owner",
        f"  p50 {_fmt_ms(pct.get('p50'))}  p95 {_fmt_ms(pct.get('p95'))}"
        f"  p99 {_fmt_ms(pct.get('p99'))}  max {_fmt_ms(pct.get('max'))}",
        f"  over the {FAILOVER_TARGET_MS / 1000:g} s target: {over}",
    ]
    by_kind: dict[str, list[int]] = {}
    for failover in verdict.failovers:
        if failover.duration_ms is not None:
            kind = failover.fault.split(" ")[0]
            by_kind.setdefault(kind, []).append(failover.duration_ms)
    for kind, values in sorted(by_kind.items()):
        p = percentiles(values)
        lines.append(
            f"    {kind:<9} n={len(values):<3} p50 {_fmt_ms(p['p50'])}  max {_fmt_ms(p['max'])}"
            f"  over target {sum(1 for v in values if v > FAILOVER_TARGET_MS)}"
        )
    outages = verdict.outages
    longest = max((w.duration_ms for w in outages), default=0)
    lines += [
        "",
        "submission unavailability (no acknowledgement while clients kept trying)",
        f"  windows >= 1 s: {len(outages)}, longest {_fmt_ms(longest)},"
        f" total {_fmt_ms(sum(w.duration_ms for w in outages))}",
    ]
    for w in sorted(outages, key=lambda w: -w.duration_ms)[:5]:
        lines.append(
            f"    {(w.start_ms - t0) / 1000:7.1f}s-{(w.end_ms - t0) / 1000:6.1f}s"
            f"  {w.duration_ms / 1000:.2f} s"
        )
    lines += ["", "verdict: " + ("PASS" if verdict.passed else "FAIL (see counter-examples)")]
    return "\n".join(lines) + "\n"


CHAOS_EXTRA_HINT = "timeline.png skipped: matplotlib is missing; pip install 'raftmesh[chaos]'"


def timeline_png(verdict: Verdict, history: History, storage: StorageSnapshot, path: Path) -> bool:
    """Draws the timeline; False when the optional ``chaos`` extra is missing.
    The text report never depends on it, and is written before this runs."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = history.start_ms

    def rel(ms: float) -> float:
        return (ms - t0) / 1000

    fig, (ax, ax_fo) = plt.subplots(
        2, 1, figsize=(14, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    seen_kinds: set[str] = set()
    for f in history.faults:
        for axis in (ax, ax_fo):
            axis.axvspan(
                rel(f.start_ms),
                rel(f.end_ms),
                color=_FAULT_COLOURS.get(f.kind, "grey"),
                alpha=0.25,
                label=None if f.kind in seen_kinds or axis is ax_fo else f.kind,
            )
        seen_kinds.add(f.kind)
    for w in verdict.outages:
        ax.axvspan(rel(w.start_ms), rel(w.end_ms), ymin=0, ymax=0.04, color="red")
    span_s = max(1.0, rel(history.end_ms))
    bins = max(1, int(span_s))
    acked = [rel(s.end_ms) for s in history.submits if s.outcome == OK]
    failed = [rel(s.end_ms) for s in history.submits if s.outcome != OK]
    finished = [
        rel(r.finished_at_ms)
        for r in storage.runs.values()
        if r.finished_at_ms is not None and r.finished_at_ms >= t0
    ]
    rng_ = (0, span_s)
    ax.hist(acked, bins=bins, range=rng_, histtype="step", color="tab:blue", label="acknowledged/s")
    ax.hist(
        finished, bins=bins, range=rng_, histtype="step", color="tab:green", label="completed/s"
    )
    ax.hist(
        failed, bins=bins, range=rng_, histtype="step", color="tab:red", label="failed attempts/s"
    )
    ax.set_ylabel("per second")
    ax.set_title("chaos timeline: faults as bands, red ticks at the bottom = submission outages")
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    done = [(f.lost_ms, f.duration_ms) for f in verdict.failovers if f.duration_ms is not None]
    ax_fo.scatter(
        [rel(lost) for lost, _ in done],
        [duration / 1000 for _, duration in done],
        s=12,
        color="black",
        label="failover duration (at owner loss)",
    )
    stuck = [f for f in verdict.failovers if f.duration_ms is None]
    if stuck:
        ax_fo.scatter(
            [rel(f.lost_ms) for f in stuck],
            [0] * len(stuck),
            marker="x",
            color="red",
            label="never resumed",
        )
    ax_fo.axhline(FAILOVER_TARGET_MS / 1000, color="grey", linestyle="--", linewidth=0.8)
    ax_fo.set_ylabel("failover (s)")
    ax_fo.set_xlabel("seconds since start")
    ax_fo.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
