"""``mesh doctor``: a check of a running mesh from outside, fit to gate a deploy.

It sees the mesh as any client does, through the HTTP API only: /v1/cluster
of the peer given with --peer, then /healthz, /readyz and /metrics of every
member that list names. ``observe`` gathers those answers; ``evaluate`` turns
them into pass/warn/fail checks without any I/O, so each verdict can be tested
on its own; the command prints them and exits 1 when any check fails.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import click
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from raftmesh.cli.remote import ca_path, peer_option, token_option
from raftmesh.mesh.client import MeshClient, MeshHTTPError

PASS, WARN, FAIL = "pass", "warn", "fail"

# Counters whose growth means runs changed owner: peers judged dead by the
# leader, peers that stopped their own runs, attempts that found a newer epoch.
CHURN_METRICS = {
    "raftmesh_peers_marked_down": "peers marked down",
    "raftmesh_self_fenced_attempts": "self-fenced attempts",
    "raftmesh_attempts:fenced": "fenced attempts",
}


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


@dataclass
class PeerProbe:
    """What one member answered; None where it did not answer at all."""

    id: str
    role: str
    status: str
    http: str
    raft: str | None
    drain: str | None
    healthy: bool | None = None
    ready: bool | None = None
    reason: str = ""
    error: str = ""
    churn: dict[str, float] | None = None


@dataclass
class Observation:
    peer_url: str
    cluster: dict[str, Any] | None = None
    error: str = ""
    peers: list[PeerProbe] = field(default_factory=list)
    # The churn counters summed over the peers at the start of the window,
    # when a window was asked for.
    churn_before: dict[str, float] | None = None
    window_s: float = 0.0


def churn_counters(metrics_text: str) -> dict[str, float]:
    """The CHURN_METRICS counters of one peer's /metrics."""
    found = dict.fromkeys(CHURN_METRICS, 0.0)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            base = sample.name.removesuffix("_total")
            if base in found:
                found[base] += sample.value
            elif base == "raftmesh_attempts" and sample.labels.get("outcome") == "fenced":
                found["raftmesh_attempts:fenced"] += sample.value
    return found


def _summed(peers: Iterable[PeerProbe]) -> dict[str, float]:
    total = dict.fromkeys(CHURN_METRICS, 0.0)
    for peer in peers:
        for name, value in (peer.churn or {}).items():
            total[name] += value
    return total


def evaluate(obs: Observation, sla_s: float) -> list[Check]:
    """The verdicts, most fundamental first."""
    if obs.cluster is None:
        return [Check("API", FAIL, f"{obs.peer_url}: {obs.error}")]
    cluster = obs.cluster
    checks = [Check("API", PASS, f"{obs.peer_url} answers as {cluster.get('self')}")]
    leader = cluster.get("leader")
    term = cluster.get("term")
    checks.append(
        Check("leader", PASS, f"{leader} leads (term {term})")
        if leader
        else Check("leader", FAIL, f"{cluster.get('self')} knows no leader (term {term})")
    )
    checks.append(_quorum(obs))
    checks.extend(_peer_check(p) for p in obs.peers)
    checks.append(_storage(obs.peers))
    checks.append(_queue(cluster.get("queue") or {}, sla_s))
    checks.append(_churn(obs))
    return checks


def _answers(peer: PeerProbe) -> bool:
    return peer.status == "up" and bool(peer.healthy)


def _quorum(obs: Observation) -> Check:
    voters = list((obs.cluster or {}).get("voters") or [])
    if not voters:
        return Check("quorum", FAIL, "the mesh reports no voters")
    by_raft = {p.raft: p for p in obs.peers if p.raft}
    alive = [v for v in voters if v in by_raft and _answers(by_raft[v])]
    majority = len(voters) // 2 + 1
    detail = f"{len(alive)} of {len(voters)} voters up and answering; a majority is {majority}"
    if len(alive) < majority:
        return Check("quorum", FAIL, detail)
    if len(voters) > 1 and len(alive) == majority:
        return Check("quorum", WARN, detail + ": one more voter lost stops the mesh")
    return Check("quorum", PASS, detail)


def _peer_check(peer: PeerProbe) -> Check:
    name = f"peer {peer.id} ({peer.role})"
    if not peer.healthy:
        why = peer.error or "/healthz did not answer 200"
        return Check(name, FAIL, f"{peer.http}: {why}; the mesh sees it {peer.status}")
    if peer.status == "joining":
        return Check(name, WARN, "joining: admitted, not yet caught up and up")
    if peer.status != "up":
        return Check(name, FAIL, f"answers /healthz but the mesh sees it {peer.status}")
    if not peer.ready:
        return Check(name, WARN, f"alive but not ready: {peer.reason or 'no reason given'}")
    if peer.drain:
        return Check(name, WARN, f"draining ({peer.drain}): takes no new runs")
    return Check(name, PASS, f"{peer.http} healthy and ready")


def _storage(peers: list[PeerProbe]) -> Check:
    answered = [p for p in peers if p.ready is not None]
    broken = [p for p in answered if "storage" in p.reason and not p.ready]
    if broken:
        reasons = "; ".join(f"{p.id}: {p.reason}" for p in broken)
        return Check("storage", FAIL, reasons)
    if not any(p.ready for p in answered):
        return Check("storage", WARN, "no ready peer to vouch for storage")
    return Check("storage", PASS, f"reachable from {sum(1 for p in answered if p.ready)} peers")


def _queue(queue: dict[str, Any], sla_s: float) -> Check:
    depth = queue.get("depth", 0)
    oldest = float(queue.get("oldest_age_s") or 0.0)
    detail = f"{depth} queued, oldest {oldest:.1f} s (SLA {sla_s:g} s)"
    if oldest > sla_s:
        return Check("queue", FAIL, detail)
    if oldest > sla_s / 2:
        return Check("queue", WARN, detail)
    return Check("queue", PASS, detail)


def _churn(obs: Observation) -> Check:
    if not any(p.churn is not None for p in obs.peers):
        return Check("lease churn", WARN, "no peer served /metrics")
    now = _summed(obs.peers)
    if obs.churn_before is None:
        parts = [f"{int(now[k])} {label}" for k, label in CHURN_METRICS.items()]
        return Check("lease churn", PASS, "since the peers started: " + ", ".join(parts))
    grown = {k: now[k] - obs.churn_before[k] for k in CHURN_METRICS if now[k] > obs.churn_before[k]}
    if grown:
        parts = [f"{int(v)} {CHURN_METRICS[k]}" for k, v in grown.items()]
        return Check("lease churn", WARN, f"in the last {obs.window_s:g} s: " + ", ".join(parts))
    return Check("lease churn", PASS, f"no owner changed in the last {obs.window_s:g} s")


async def observe(
    peer_url: str, token: str | None, timeout_s: float, window_s: float
) -> Observation:
    obs = Observation(peer_url, window_s=window_s)
    ca = ca_path()
    async with MeshClient(peer_url, token, timeout_s=timeout_s, ca=ca) as entry:
        try:
            obs.cluster = await entry.cluster()
        except MeshHTTPError as exc:
            obs.error = f"answered {exc.status} {exc.code}: {exc.message}"
            return obs
        except (aiohttp.ClientError, TimeoutError) as exc:
            obs.error = f"cannot reach it: {exc or type(exc).__name__}"
            return obs
    # Members that left are history, not peers to check.
    obs.peers = [
        PeerProbe(
            id=p["id"],
            role=p.get("role", "voter"),
            status=p["status"],
            http=p["http"],
            raft=p.get("raft"),
            drain=p.get("drain"),
        )
        for p in obs.cluster.get("peers", [])
        if p["status"] != "left"
    ]
    scheme = peer_url.partition("://")[0]
    clients = {
        p.id: MeshClient(f"{scheme}://{p.http}", token, timeout_s=timeout_s, ca=ca)
        for p in obs.peers
    }
    try:
        await asyncio.gather(*(_probe(p, clients[p.id]) for p in obs.peers))
        if window_s > 0:
            obs.churn_before = _summed(obs.peers)
            await asyncio.sleep(window_s)
            sampled = [p for p in obs.peers if p.churn is not None]
            await asyncio.gather(*(_sample_churn(p, clients[p.id]) for p in sampled))
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()))
    return obs


async def _probe(peer: PeerProbe, client: MeshClient) -> None:
    try:
        peer.healthy = await client.healthz()
        if not peer.healthy:
            peer.error = "/healthz did not answer 200 (unreachable or failing)"
            return
        peer.ready, peer.reason = await client.readiness()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        peer.error = f"{type(exc).__name__}: {exc}"
        return
    await _sample_churn(peer, client)


async def _sample_churn(peer: PeerProbe, client: MeshClient) -> None:
    try:
        peer.churn = churn_counters(await client.metrics())
    except (aiohttp.ClientError, TimeoutError, MeshHTTPError, ValueError):
        peer.churn = None


STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red"}


def render(checks: list[Check], console: Console) -> None:
    table = Table(title="mesh doctor")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for check in checks:
        table.add_row(check.name, f"[{STYLE[check.status]}]{check.status}[/]", check.detail)
    console.print(table)
    counts = {s: sum(1 for c in checks if c.status == s) for s in (PASS, WARN, FAIL)}
    console.print(f"{counts[PASS]} passed, {counts[WARN]} warned, {counts[FAIL]} failed")


@click.command()
@peer_option
@token_option
@click.option(
    "--sla",
    "sla_s",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds the oldest queued run may wait (fail above it, warn above half).",
)
@click.option(
    "--window",
    "window_s",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Watch the lease churn counters this many seconds and warn if they grow "
    "(0: show their totals since the peers started).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=3.0,
    show_default=True,
    help="Seconds to wait for each answer.",
)
@click.option("--strict", is_flag=True, help="Exit 1 on a warning too.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(
    peer: str,
    token: str | None,
    sla_s: float,
    window_s: float,
    timeout_s: float,
    strict: bool,
    as_json: bool,
) -> None:
    """Check a running mesh: leader, quorum, every peer, storage, queue, lease churn.

    Every member must be reachable at the HTTP address it advertises. Exits 1
    when a check fails (with --strict also on a warning), 0 otherwise: use it
    as a deploy gate.
    """
    checks = evaluate(asyncio.run(observe(peer, token, timeout_s, window_s)), sla_s)
    if as_json:
        click.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        render(checks, Console())
    bad = {FAIL, WARN} if strict else {FAIL}
    raise SystemExit(1 if any(c.status in bad for c in checks) else 0)
