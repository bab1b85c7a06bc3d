"""The scenarios of issue 12, each a coroutine from ``Params`` to a ``Result``.

Sizes come from ``Params.size(full, smoke)``: the issue's figure, scaled by
``--scale``, replaced by ``--n``, or cut to a seconds-long smoke. Targets are
the issue's, printed beside what was measured; nothing here asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from raftmesh.bench import peers
from raftmesh.bench.env import DEFAULT_REDIS, RedisServer, raw_commit_rate
from raftmesh.bench.mesh import (
    BenchMesh,
    bench_mesh,
    median,
    percentile,
    poll,
    submit_closed_loop,
    submit_open_loop,
)
from raftmesh.bench.report import Figure, Result, at_least, at_most
from raftmesh.consensus.state import SHORT_COMMAND_TTL_MS
from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.storage import Store, open_store

IN_FLIGHT = 64
PEERS = 3
SLOTS = 4
# Runs a peer holds ready beyond its slots in the short-run scenarios: like
# Celery's prefetch, which its worker here has at its default (4 a process).
PREFETCH = SLOTS
SHARED_NOTE = "2 shared cores: other engineers' tests ran on this machine meanwhile"


@dataclass(frozen=True)
class Params:
    pg_url: str
    workdir: Path
    smoke: bool = False
    scale: float = 1.0
    n: int | None = None
    systems: tuple[str, ...] = ("raftmesh", "celery", "procrastinate", "dbos")
    redis: str = DEFAULT_REDIS

    def size(self, full: int, smoke: int) -> int:
        if self.n is not None:
            return self.n
        return smoke if self.smoke else max(1, round(full * self.scale))

    def seconds(self, full: float, smoke: float) -> float:
        return smoke if self.smoke else full * self.scale

    def describe(self, **sizes: Any) -> dict[str, Any]:
        return {"smoke": self.smoke, "scale": self.scale, "n": self.n, **sizes}


Scenario = Callable[[Params], Coroutine[Any, Any, Result]]


_PREFETCHING = {"MESH_PREFETCH": str(PREFETCH)}


def _ms(seconds: float) -> float:
    return seconds * 1000


# --- acceptance ---------------------------------------------------------------

# What can hold an acknowledgement up, as the peers measure it.
STALLS = {
    "raftmesh_gc_pause_seconds": "collector pauses",
    "raftmesh_event_loop_lag_seconds": "event-loop lags",
    "raftmesh_raft_commit_seconds": "Raft commits",
}
STALL_S = 0.025


async def acceptance(p: Params) -> Result:
    """Acknowledged submissions: a closed loop of 64, then a fixed offered rate;
    on peers that only accept, then on peers that also run what they accept."""
    n = p.size(5000, 100)
    rate = 500.0
    duration = p.seconds(20.0, 1.0)
    result = Result(
        "acceptance", p.describe(n=n, in_flight=IN_FLIGHT, rate=rate, duration_s=duration)
    )
    # Runs are acknowledged faster than 12 slots finish them, so the queue
    # outgrows the default tenant maximum (10,000) and the open loop would
    # measure the 429s of backpressure instead of acknowledgements.
    queue_limit = 2 * (min(100, n) + n + int(rate * duration))
    env = {"MESH_DEFAULT_TENANT_MAX_QUEUED": str(queue_limit)}
    # Without slots the figures are the control plane's own; with them, the
    # same cores also claim, run and finish the runs as they come.
    for slots, where in ((0, "no slots"), (SLOTS, f"{SLOTS} slots a peer")):
        async with bench_mesh(p.pg_url, peers=PEERS, slots=slots, env=env) as m:
            await _acceptance_on(m, n, rate, duration, where, result)
    result.notes.append(
        f"the tenant's queued maximum raised to {queue_limit:,} (backpressure is not measured)"
    )
    result.notes.append(SHARED_NOTE)
    return result


async def _acceptance_on(
    m: BenchMesh, n: int, rate: float, duration: float, where: str, result: Result
) -> None:
    await submit_closed_loop(m.clients, min(100, n), 16, lambda i: ("echo", None))
    closed = await submit_closed_loop(m.clients, n, IN_FLIGHT, lambda i: ("echo", None))
    await asyncio.sleep(1.0)
    before = await m.over(STALLS, STALL_S)
    latencies, errors = await submit_open_loop(m.clients, rate, duration, "echo", None)
    after = await m.over(STALLS, STALL_S)
    for name, label in STALLS.items():
        above, total = after[name][0] - before[name][0], after[name][1] - before[name][1]
        result.notes.append(
            f"{where}, offered {rate:.0f}/s: {above:,} of {total:,} {label} over "
            f"{_ms(STALL_S):.0f} ms, on all peers"
        )
    result.add(
        Figure(
            f"acks/s, closed loop, {where}",
            closed.per_s,
            "/s",
            at_least(2000, "≥ 2,000/s"),
            f"{n:,} submissions, {IN_FLIGHT} in flight, {PEERS} peers",
        ),
        Figure(f"ack latency p50, closed loop, {where}", _ms(median(closed.latencies_s)), "ms"),
        Figure(
            f"ack latency p99, closed loop, {where}",
            _ms(percentile(closed.latencies_s, 99)),
            "ms",
        ),
    )
    if latencies:
        result.add(
            Figure(
                f"ack latency p50 at {rate:.0f}/s offered, {where}",
                _ms(median(latencies)),
                "ms",
                note=f"{len(latencies):,} acknowledged, {errors} errors",
            ),
            Figure(
                f"ack latency p99 at {rate:.0f}/s offered, {where}",
                _ms(percentile(latencies, 99)),
                "ms",
                at_most(20, "≤ 20 ms"),
                "counted from each submission's scheduled time",
            ),
        )
    result.series[f"closed loop, {where}"] = _cdf(closed.latencies_s)
    result.series[f"{rate:.0f}/s offered, {where}"] = _cdf(latencies)


def _cdf(latencies_s: list[float]) -> tuple[str, str, list[tuple[float, float]]]:
    ordered = sorted(latencies_s)
    step = max(1, len(ordered) // 200)
    points = [(_ms(v), 100 * (i + 1) / len(ordered)) for i, v in enumerate(ordered)][::step]
    return "ack latency (ms)", "percentile", points


# --- short-runs ---------------------------------------------------------------


async def short_runs(p: Params) -> Result:
    """N no-op runs end to end on raftmesh and on each peer system, same machine, one run."""
    n = p.size(2000, 60)
    commit_s = p.seconds(3.0, 0.5)
    timeout_s = 60 + n  # generous: a run that slow is itself the finding
    result = Result("short-runs", p.describe(n=n, in_flight=IN_FLIGHT, peers=PEERS, slots=SLOTS))
    rates: dict[str, float] = {}
    if "raftmesh" in p.systems:
        async with bench_mesh(p.pg_url, peers=PEERS, slots=SLOTS) as m:
            unfetched = await _mesh_short_runs(m, n, timeout_s)
        async with bench_mesh(p.pg_url, peers=PEERS, slots=SLOTS, env=_PREFETCHING) as m:
            mesh_figures = await _mesh_short_runs(m, n, timeout_s)
        rates["raftmesh"] = mesh_figures.per_s
        result.add(
            Figure(
                "raftmesh runs/s end to end",
                mesh_figures.per_s,
                "/s",
                at_least(1000, "≥ 1,000/s"),
                f"{PEERS} peers × {SLOTS} slots, prefetch {PREFETCH}, "
                f"{IN_FLIGHT} in flight over HTTP",
            ),
            Figure(
                "raftmesh runs/s, prefetch off",
                unfetched.per_s,
                "/s",
                note="the same runs on a mesh at the default prefetch, 0",
            ),
            Figure(
                "raftmesh claim → result p50",
                mesh_figures.claim_to_result_ms,
                "ms",
                note="a run's time on its slot: storage's started_at to finished_at",
            ),
            Figure(
                "raftmesh journal syncs per run, a follower",
                mesh_figures.follower_syncs_per_run,
                "",
                note="Raft journal fsyncs of one non-leader peer ÷ runs",
            ),
        )
    workdir = p.workdir
    redis = RedisServer(p.redis)
    comparisons: list[tuple[str, str, float, str, Callable[[], Awaitable[peers.Outcome]]]] = [
        (
            "celery",
            "Celery+Redis",
            1.5,
            "acks_late, prefork × 3; sent from one thread",
            lambda: peers.celery(redis, workdir, n, timeout_s),
        ),
        (
            "procrastinate",
            "procrastinate",
            2.0,
            f"one worker, concurrency 3; {IN_FLIGHT} deferring at once",
            lambda: peers.procrastinate(p.pg_url, workdir, n, IN_FLIGHT, timeout_s),
        ),
        (
            "dbos",
            "DBOS",
            3.0,
            f"one process, {IN_FLIGHT} threads each start_workflow and wait",
            lambda: peers.dbos(p.pg_url, workdir, n, 0, IN_FLIGHT, timeout_s),
        ),
    ]
    try:
        for key, label, factor, how, run in comparisons:
            if key not in p.systems:
                continue
            outcome = await run()
            rates[key] = outcome.per_s
            result.add(Figure(f"{label} runs/s end to end", outcome.per_s, "/s", note=how))
            if "raftmesh" in rates:
                result.add(
                    Figure(
                        f"raftmesh ÷ {label}",
                        rates["raftmesh"] / outcome.per_s if outcome.per_s else None,
                        "×",
                        at_least(factor, f"≥ {factor:g}×"),
                    )
                )
    finally:
        redis.stop()
    for clients in (1, 8):
        commits = await raw_commit_rate(p.pg_url, clients, commit_s)
        result.add(
            Figure(
                f"raw PostgreSQL commits/s, {clients} client{'s' if clients > 1 else ''}",
                commits.per_s,
                "/s",
                note="the physical limit: one durable write per run outcome",
            )
        )
    result.bars = {system: rate for system, rate in rates.items()}
    result.bars_label = "runs/s end to end"
    result.notes.append(SHARED_NOTE)
    return result


@dataclass(frozen=True)
class _MeshShortRuns:
    per_s: float
    claim_to_result_ms: float | None
    follower_syncs_per_run: float | None


async def _mesh_short_runs(m: BenchMesh, n: int, timeout_s: float) -> _MeshShortRuns:
    warm = min(100, max(1, n // 10))
    await submit_closed_loop(m.clients, warm, 16, lambda i: ("echo", None))
    await m.wait_finished(warm, timeout_s)
    follower = await _follower(m)
    syncs_before = await _journal_syncs(follower) if follower is not None else None
    sent = await submit_closed_loop(m.clients, n, IN_FLIGHT, lambda i: ("echo", None))
    last = await m.wait_finished(warm + n, timeout_s)
    syncs_after = await _journal_syncs(follower) if follower is not None else None
    (on_slot,) = (
        await m.sql(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY finished_at_ms - started_at_ms)"
            f" FROM {m.table} WHERE id = ANY($1::text[]) AND status = 'succeeded'",
            sent.ids,
        )
    )[0]
    syncs = (
        (syncs_after - syncs_before) / n
        if syncs_before is not None and syncs_after is not None
        else None
    )
    return _MeshShortRuns(
        n / (last - sent.first_at), None if on_slot is None else float(on_slot), syncs
    )


async def _follower(m: BenchMesh) -> MeshClient | None:
    leader = await poll(m.leader, 20)
    for client, peer in zip(m.clients, m.mesh.peers, strict=True):
        if peer.id != leader:
            return client
    return None


async def _journal_syncs(client: MeshClient) -> float | None:
    """The peer's ``raftmesh_journal_syncs`` gauge, from its /metrics."""
    for line in (await client.metrics()).splitlines():
        if line.startswith("raftmesh_journal_syncs "):
            return float(line.split()[1])
    return None


# --- steps --------------------------------------------------------------------

STEPS = 5


async def steps(p: Params) -> Result:
    """5-step runs: checkpoints/s for raftmesh and DBOS, against the raw commit rate."""
    n = p.size(1000, 30)
    timeout_s = 60 + n
    result = Result("steps", p.describe(n=n, steps=STEPS, in_flight=IN_FLIGHT))
    commits = await raw_commit_rate(p.pg_url, 8, p.seconds(3.0, 0.5))
    result.add(Figure("raw PostgreSQL commits/s, 8 clients", commits.per_s, "/s"))
    spec = {"steps": STEPS, "step_seconds": 0}
    if "raftmesh" in p.systems:
        async with bench_mesh(p.pg_url, peers=PEERS, slots=SLOTS, env=_PREFETCHING) as m:
            sent = await submit_closed_loop(m.clients, n, IN_FLIGHT, lambda i: ("steps", spec))
            await m.wait_finished(n, timeout_s)
            count, last_ms = (await m.sql(f'SELECT count(*), max(at_ms) FROM "{m.schema}".steps'))[
                0
            ]
        rate = count / (last_ms / 1000 - sent.first_at)
        result.add(
            Figure(
                "raftmesh checkpoints/s",
                rate,
                "/s",
                note=f"{count:,} steps of {n:,} runs, prefetch {PREFETCH}",
            ),
            Figure(
                "raftmesh ÷ raw 8-client commit rate",
                rate / commits.per_s,
                "",
                at_least(0.30, "≥ 0.30"),
            ),
        )
    if "dbos" in p.systems:
        outcome = await peers.dbos(p.pg_url, p.workdir, n, STEPS, IN_FLIGHT, timeout_s)
        dbos_rate = outcome.checkpoints / outcome.seconds
        result.add(
            Figure(
                "DBOS checkpoints/s",
                dbos_rate,
                "/s",
                note=f"{outcome.checkpoints:,} step outputs of {n:,} workflows",
            ),
            Figure("DBOS ÷ raw 8-client commit rate", dbos_rate / commits.per_s, ""),
        )
    result.notes.append(SHARED_NOTE)
    return result


# --- many-agents --------------------------------------------------------------


async def many_agents(p: Params) -> Result:
    """10,000 I/O-bound runs: 5 steps of 200 ms simulated model latency, a checkpoint each."""
    n = p.size(10_000, 60)
    slots = 1000 if not p.smoke else 20
    step_s = 0.2
    waves = math.ceil(n / (PEERS * slots))
    at_once = waves * STEPS * step_s
    result = Result(
        "many-agents", p.describe(n=n, steps=STEPS, step_s=step_s, slots=slots, peers=PEERS)
    )
    spec = {"steps": STEPS, "step_seconds": step_s}
    async with bench_mesh(p.pg_url, peers=PEERS, slots=slots) as m:
        rss_peak: dict[str, float] = {}
        rss_series: list[tuple[float, float]] = []
        started = time.monotonic()

        async def sample() -> None:
            while True:
                now = m.rss_mb()
                for peer, mb in now.items():
                    rss_peak[peer] = max(rss_peak.get(peer, 0.0), mb)
                if now:
                    rss_series.append((time.monotonic() - started, max(now.values())))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        try:
            sent = await submit_closed_loop(m.clients, n, IN_FLIGHT, lambda i: ("steps", spec))
            last = await m.wait_finished(n, 120 + n)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        count = (await m.sql(f'SELECT count(*) FROM "{m.schema}".steps'))[0][0]
        suspected = await m.counted("raftmesh_peers_marked_down_total")
        fenced = await m.counted("raftmesh_self_fenced_attempts_total")
    makespan = last - sent.first_at
    ideal = ideal_makespan(sent.acked_s, PEERS * slots, STEPS * step_s)
    result.add(
        Figure("makespan", makespan, "s", note=f"{n:,} runs on {PEERS} × {slots} slots"),
        Figure(
            "ideal makespan",
            ideal,
            "s",
            note="each run started on a free slot the moment it was acknowledged",
        ),
        Figure("makespan ÷ ideal", makespan / ideal, "×", at_most(1.5, "≤ 1.5×")),
        Figure(
            "makespan ÷ all submitted at once",
            makespan / at_once,
            "×",
            note=f"{waves} wave(s) × {STEPS} × {step_s:g} s = {at_once:g} s",
        ),
        Figure("checkpoints/s", count / makespan, "/s", note=f"{count:,} steps"),
        Figure("submissions acknowledged/s", sent.per_s, "/s"),
        Figure("peer RSS, peak", max(rss_peak.values(), default=None), "MB"),
        Figure(
            "peers marked down (false suspicions)",
            suspected,
            "",
            at_most(0, "0"),
            note="no fault is injected: every one is false",
        ),
        Figure(
            "attempts self-fenced (false)",
            fenced,
            "",
            at_most(0, "0"),
            note="stopped by a peer that thought it had lost the leader",
        ),
    )
    result.series["max peer RSS (MB)"] = ("seconds", "MB", rss_series)
    result.notes.append(SHARED_NOTE)
    return result


def ideal_makespan(acked_s: list[float], slots: int, run_s: float) -> float:
    """The makespan of a scheduler that costs nothing: every run starts on the
    first free slot once acknowledged, and takes ``run_s``. The issue's own
    ideal ("submission time plus 1 s" for one wave) is this with one slot per
    run; with fewer slots than runs the waves add up too."""
    free = [0.0] * min(slots, len(acked_s))
    end = 0.0
    for at in sorted(acked_s):
        finish = max(at, heapq.heappop(free)) + run_s
        heapq.heappush(free, finish)
        end = max(end, finish)
    return end


# --- failover -----------------------------------------------------------------


async def failover(p: Params) -> Result:
    """kill -9 a follower owning R running runs, then the leader."""
    per_peer = p.size(100, 5)
    step_s = 0.5 if not p.smoke else 0.2
    steps_n = 120 if not p.smoke else 60
    result = Result(
        "failover", p.describe(runs_per_peer=per_peer, step_s=step_s, steps=steps_n, peers=PEERS)
    )
    spec = {"steps": steps_n, "step_seconds": step_s}
    # Room on the survivors for the victim's runs: twice what each one gets.
    async with bench_mesh(p.pg_url, peers=PEERS, slots=2 * per_peer) as m:
        store = open_store(m.mesh.storage)
        await store.open()
        try:
            sent = await submit_closed_loop(
                m.clients, PEERS * per_peer, IN_FLIGHT, lambda i: ("steps", spec)
            )
            owners = await _wait_all_running(m, sent.ids, 60)
            leader = await poll(m.leader, 20)
            victim = max(
                (peer for peer in set(owners.values()) if peer != leader),
                key=lambda peer: sum(1 for o in owners.values() if o == peer),
            )
            await asyncio.sleep(1.0)  # a step or two checkpointed everywhere
            follower = await _kill_and_resume(m, store, owners, victim, step_s)
            result.add(*_resume_figures("killed follower owner", follower, 2.0, "≤ 2 s"))
            result.series["follower owner killed"] = _cdf_s(follower)

            m.mesh.restart(victim)
            await m.mesh.wait_ready(60, [victim])
            owners = await _wait_all_running(m, sent.ids, 60)
            leader = await poll(m.leader, 20)
            killed_at, first_accept = await _kill_leader(m, leader)
            result.add(
                Figure(
                    "leader killed → first accepted submission",
                    first_accept,
                    "s",
                    at_most(3.0, "≤ 3 s"),
                )
            )
            if any(o == leader for o in owners.values()):
                resumed = await _resumed_after(store, owners, leader, step_s, killed_at)
                result.add(*_resume_figures("killed leader owner", resumed, 3.0, "≤ 3 s"))
                result.series["leader owner killed"] = _cdf_s(resumed)
        finally:
            await store.close()
    result.notes.append(
        "resumption = kill → the start of the run's next step on its new owner "
        "(first new-epoch checkpoint minus one step's duration)"
    )
    result.notes.append(SHARED_NOTE)
    return result


def _cdf_s(values_s: list[float]) -> tuple[str, str, list[tuple[float, float]]]:
    ordered = sorted(values_s)
    return (
        "seconds",
        "percentile",
        [(v, 100 * (i + 1) / len(ordered)) for i, v in enumerate(ordered)],
    )


def _resume_figures(who: str, delays_s: list[float], bound: float, text: str) -> list[Figure]:
    if not delays_s:
        return [Figure(f"{who}: runs resumed", 0, note="the killed peer owned no running run")]
    return [
        Figure(f"{who}: kill → next step p50", median(delays_s), "s"),
        Figure(f"{who}: kill → next step p99", percentile(delays_s, 99), "s", at_most(bound, text)),
        Figure(f"{who}: kill → next step max", max(delays_s), "s", note=f"{len(delays_s)} runs"),
    ]


async def _wait_all_running(m: BenchMesh, ids: list[str], timeout_s: float) -> dict[str, str]:
    """Run id -> owner of the running ones, once none of ``ids`` is still queued."""

    async def check() -> dict[str, str] | None:
        rows = await m.sql(
            f"SELECT id, owner, status FROM {m.table} WHERE id = ANY($1::text[])", ids
        )
        if len(rows) == len(ids) and all(r["status"] != "queued" for r in rows):
            return {r["id"]: r["owner"] for r in rows if r["status"] == "running"}
        return None

    found: dict[str, str] = await poll(check, timeout_s, 0.1)
    return found


async def _kill_and_resume(
    m: BenchMesh, store: Store, owners: dict[str, str], victim: str, step_s: float
) -> list[float]:
    killed_at = time.time()
    m.mesh.kill(victim)
    return await _resumed_after(store, owners, victim, step_s, killed_at)


async def _resumed_after(
    store: Store, owners: dict[str, str], victim: str, step_s: float, killed_at: float
) -> list[float]:
    """Kill → the start of the next step elsewhere, for every run ``victim`` owned
    (runs not resumed within 60 s are left out, and show as fewer runs)."""
    pending = {run for run, owner in owners.items() if owner == victim}
    delays: list[float] = []
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for run in list(pending):
            row = await store.get_run(run)
            if row is None or row.owner in (None, victim):
                continue
            new = [s.at_ms for s in await store.load_steps(run) if s.epoch == row.epoch]
            if new:
                delays.append((min(new) - _ms(step_s)) / 1000 - killed_at)
                pending.discard(run)
        await asyncio.sleep(0.1)
    return delays


async def _kill_leader(m: BenchMesh, leader: str) -> tuple[float, float]:
    """kill -9 the leader; (wall-clock kill time, seconds until a survivor accepts a submission)."""
    survivors = [MeshClient(peer.url, timeout_s=1.0) for peer in m.mesh.peers if peer.id != leader]
    killed_at = time.time()
    started = time.monotonic()
    m.mesh.kill(leader)
    try:
        i = 0
        while time.monotonic() - started < 30:
            try:
                await survivors[i % len(survivors)].submit("echo", None)
                return killed_at, time.monotonic() - started
            except (MeshHTTPError, aiohttp.ClientError, TimeoutError):
                i += 1
                await asyncio.sleep(0.01)
        raise TimeoutError("no survivor accepted a submission within 30 s of the leader's kill")
    finally:
        for client in survivors:
            await client.close()


# --- footprint ----------------------------------------------------------------


async def footprint(p: Params) -> Result:
    """Idle RSS, RSS per 1,000 in-flight runs, Raft state as finished runs pile up."""
    in_flight = p.size(9000, 60)
    finished = p.size(100_000, 90)
    result = Result("footprint", p.describe(in_flight=in_flight, finished=finished, peers=PEERS))
    per_peer = math.ceil(in_flight / PEERS)
    async with bench_mesh(p.pg_url, peers=PEERS, slots=per_peer + 1) as m:
        await asyncio.sleep(p.seconds(5.0, 1.0))
        idle = max(m.rss_mb().values())
        levels: list[tuple[float, float]] = [(0.0, idle)]
        spec = {"seconds": 3600}
        submitted = 0
        for level in (in_flight // 3, 2 * in_flight // 3, in_flight):
            await submit_closed_loop(
                m.clients, level - submitted, IN_FLIGHT, lambda i: ("sleep", spec)
            )
            submitted = level
            await _wait_running(m, level, 60 + level / 50)
            await asyncio.sleep(1.0)
            levels.append((level / PEERS, max(m.rss_mb().values())))
    slope = _slope(levels) * 1000
    at_3000 = idle + slope * 3
    result.add(
        Figure("idle peer RSS", idle, "MB", at_most(80, "≤ 80 MB"), "largest of 3 peers"),
        Figure("RSS per 1,000 in-flight runs", slope, "MB", note="per peer, least squares"),
        Figure(
            "peer RSS at 3,000 in-flight runs",
            levels[-1][1] if levels[-1][0] >= 3000 else at_3000,
            "MB",
            at_most(150, "≤ 150 MB"),
            "measured" if levels[-1][0] >= 3000 else f"extrapolated from {levels[-1][0]:,.0f}/peer",
        ),
    )
    result.series["peer RSS (MB)"] = ("in-flight runs per peer", "MB", levels)

    # (finished runs, seconds since the first submission, sizes)
    sizes: list[tuple[int, float, dict[str, float | None]]] = []
    async with bench_mesh(p.pg_url, peers=PEERS, slots=SLOTS) as m:
        chunk = max(1, finished // 10)
        done = 0
        started = time.monotonic()
        while done < finished:
            count = min(chunk, finished - done)
            await submit_closed_loop(m.clients, count, IN_FLIGHT, lambda i: ("echo", None))
            done += count
            await m.wait_finished(done, 120 + count)
            sizes.append((done, time.monotonic() - started, _raft_files_kb(m)))
    for key in ("snapshot", "journal"):
        points = [(float(d), kb) for d, _, s in sizes if (kb := s[key]) is not None]
        result.series[f"{key} (KB)"] = ("finished runs", "KB", points)
    # The state remembers the command ids of the last minute (the command
    # window): it fills during the first minute whatever the runs do, so growth
    # is counted from the first size taken once the window is full.
    window_s = SHORT_COMMAND_TTL_MS / 1000
    warm = next((entry for entry in sizes[:-1] if entry[1] >= window_s), None)
    last = sizes[-1][2]
    first = None
    since = f"not measured: the run ended within the {window_s:.0f} s command window"
    if warm is not None:
        first = warm[2]
        since = f"from {warm[0]:,} runs ({warm[1]:.0f} s, the command window full)"
    result.add(
        Figure("Raft journal after all finished", last["journal"], "KB", note=f"{finished:,} runs"),
        Figure(
            "Raft snapshot after all finished",
            last["snapshot"],
            "KB",
            note="" if last["snapshot"] is not None else "no snapshot written yet",
        ),
        Figure(
            "snapshot growth to the last",
            _growth(first["snapshot"] if first else None, last["snapshot"]),
            "×",
            at_most(1.25, "flat (≤ 1.25×)"),
            since,
        ),
        Figure(
            "journal growth to the last",
            _growth(first["journal"] if first else None, last["journal"]),
            "×",
            at_most(1.25, "flat (≤ 1.25×)"),
            since,
        ),
    )
    result.notes.append(
        "Raft sizes: the largest raft.journal and raft.dump among the peers' data dirs (the "
        "journal file grows by doubling: its size is the disk it holds, not its live entries); "
        "pysyncobj compacts (writes the snapshot) after 5,000 entries or 300 s"
    )
    result.notes.append(SHARED_NOTE)
    return result


async def _wait_running(m: BenchMesh, count: int, timeout_s: float) -> None:
    async def check() -> bool:
        rows = await m.sql(f"SELECT count(*) FROM {m.table} WHERE status = 'running'")
        return bool(rows[0][0] >= count)

    await poll(check, timeout_s, 0.2)


def _raft_files_kb(m: BenchMesh) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, key in (("raft.journal", "journal"), ("raft.dump", "snapshot")):
        sizes = [
            (peer.data_dir / name).stat().st_size / 1024
            for peer in m.mesh.peers
            if (peer.data_dir / name).exists()
        ]
        out[key] = max(sizes) if sizes else None
    return out


def _growth(first: float | None, last: float | None) -> float | None:
    return last / first if first and last is not None else None


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


SCENARIOS: dict[str, Scenario] = {
    "acceptance": acceptance,
    "short-runs": short_runs,
    "steps": steps,
    "many-agents": many_agents,
    "failover": failover,
    "footprint": footprint,
}
