"""/metrics explains load: scraped from live peers during a workload and a
failover, the queue, running, assignment latency and failover series move as
an operator would expect, and the text passes ``promtool check metrics``."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import MakeMesh, eventually, submit_retrying, wait_all_terminal

from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh

pytestmark = pytest.mark.slow

RUNS = 14
SLOTS = 2
STEPS = {"steps": 8, "step_seconds": 0.4}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def promtool_check(text: str) -> None:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: run scripts/test.sh, or apt-get install -y prometheus")
    checked = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def scrape(mesh: DevMesh, peer_id: str) -> str:
    async with MeshClient(mesh.url(peer_id), timeout_s=5) as client:
        return await client.metrics_text()


async def scrape_all(mesh: DevMesh) -> dict[str, str]:
    peers = [p.id for p in mesh.peers if p.running]
    texts = await asyncio.gather(*(scrape(mesh, p) for p in peers))
    return dict(zip(peers, texts, strict=True))


async def test_metrics_follow_a_workload_and_a_failover(make_mesh: MakeMesh) -> None:
    mesh = await make_mesh("postgres", 3, slots=SLOTS)
    async with MeshClient(mesh.url("peer-1")) as client:
        before = await scrape(mesh, "peer-1")
        assert value(before, "raftmesh_queue_depth") == 0
        assert value(before, "raftmesh_assignment_latency_seconds_count") == 0
        promtool_check(before)

        ids = [(await submit_retrying(client, "steps", STEPS))["id"] for _ in range(RUNS)]

        async def loaded() -> dict[str, str] | None:
            texts = await scrape_all(mesh)
            one = texts["peer-1"]
            full = value(one, "raftmesh_runs", status="running") == 3 * SLOTS
            queued = value(one, "raftmesh_queue_depth") > 0
            running = sum(value(t, "raftmesh_running_runs") for t in texts.values())
            return texts if full and queued and running == 3 * SLOTS else None

        texts = await eventually(loaded, 20, "every slot busy with runs still queued")
        one = texts["peer-1"]
        assert value(one, "raftmesh_queue_depth") == RUNS - 3 * SLOTS
        assert value(one, "raftmesh_runs", status="queued") == RUNS - 3 * SLOTS
        assert value(one, "raftmesh_queue_oldest_age_seconds") > 0
        claimed = sum(value(t, "raftmesh_assignment_latency_seconds_count") for t in texts.values())
        assert claimed >= 3 * SLOTS
        for text in texts.values():
            promtool_check(text)

        cluster = await client.cluster()
        leader = cluster["leader"]
        # Not the leader (whose counters we read) and not peer-1 (our client).
        victim = next(
            p["id"] for p in cluster["peers"] if p["id"] not in (leader, "peer-1") and p["running"]
        )
        mesh.kill(victim)

        async def failed_over() -> str | None:
            text = await scrape(mesh, leader)
            moved = value(text, "raftmesh_failovers_total") >= 1
            timed = value(text, "raftmesh_failover_duration_seconds_count") >= 1
            return text if moved and timed else None

        text = await eventually(failed_over, 20, f"the leader to fail over {victim}'s runs")
        assert value(text, "raftmesh_peers_marked_down_total") >= 1
        assert value(text, "raftmesh_peers", status="down") == 1
        # Reassigned within the TTL plus a scheduling round, not minutes.
        total = value(text, "raftmesh_failover_duration_seconds_sum")
        count = value(text, "raftmesh_failover_duration_seconds_count")
        assert 0 < total / count < 10
        promtool_check(text)

        runs = await wait_all_terminal(client, ids, timeout_s=90)
        assert {r["status"] for r in runs.values()} == {"succeeded"}

        after = await scrape_all(mesh)
        for peer_id, text in after.items():
            assert value(text, "raftmesh_queue_depth") == 0, peer_id
            assert value(text, "raftmesh_runs", status="running") == 0, peer_id
            promtool_check(text)
        finished = sum(
            value(t, "raftmesh_runs_finished_total", status="succeeded") for t in after.values()
        )
        # The victim's own count died with it; what the survivors wrote is the rest.
        assert finished >= RUNS - 2 * SLOTS
        commits = value(after[leader], "raftmesh_raft_commit_seconds_count")
        assert commits > 0
        assert value(after[leader], "raftmesh_raft_commit_index") > 0
        assert value(after[leader], "raftmesh_storage_pool_connections") >= 1
        # Probed ten times a second from the start, so a peer up this long has many.
        assert value(after[leader], "raftmesh_event_loop_lag_seconds_count") > 20
        assert value(after[leader], "raftmesh_raft_journal_sync_seconds_count") > 0
