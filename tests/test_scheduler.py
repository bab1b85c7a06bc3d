"""The leader's placement policy, on states built through ``apply`` (no sockets)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from raftmesh.consensus import commands as c
from raftmesh.consensus.spec import CONSISTENT_HASH, ROUND_ROBIN
from raftmesh.consensus.state import MeshState, backoff_ms
from raftmesh.mesh.scheduler import Scheduler
from raftmesh.mesh.settings import Settings, SettingsError

T0 = 1_000_000


class Mesh:
    def __init__(self) -> None:
        self.state = MeshState()
        self.n = 0

    def apply(self, cmd: dict[str, Any]) -> dict[str, Any]:
        result = self.state.apply(cmd)
        assert result.ok, result
        return result

    def cid(self) -> str:
        self.n += 1
        return f"c{self.n}"

    def peer(self, peer_id: str, slots: int = 4, labels: dict[str, str] | None = None) -> None:
        self.apply(c.PeerUp(self.cid(), T0, peer_id, "i1", "r", "h", slots, labels or {}))

    def submit(self, at_ms: int = T0, **spec: Any) -> str:
        self.n += 1
        run = {"id": f"r{self.n:03d}", "agent": "echo", "input": None, **spec}
        entry = self.apply(c.Submit(self.cid(), at_ms, [run])).runs[0]
        assert entry.created, entry
        return run["id"]

    def assign(self, plan: list[tuple[str, str, int]], at_ms: int = T0) -> list[str]:
        return self.apply(c.Assign(self.cid(), at_ms, 1, plan)).accepted


def test_priority_first_then_fifo_and_aging_lifts_old_low_priority_runs() -> None:
    mesh = Mesh()
    old_low = mesh.submit(priority=0)
    high = mesh.submit(at_ms=T0 + 10_000, priority=2)
    mid_a = mesh.submit(at_ms=T0 + 10_000, priority=1)
    mid_b = mesh.submit(at_ms=T0 + 11_000, priority=1)
    plain = Scheduler(aging_s=0)
    assert [r.id for r in plain.order(mesh.state, T0 + 12_000)] == [high, mid_a, mid_b, old_low]
    # waiting 5 s per level: at 12 s old_low has aged to priority 2, older than high
    aged = Scheduler(aging_s=5)
    assert [r.id for r in aged.order(mesh.state, T0 + 12_000)] == [old_low, high, mid_a, mid_b]


def test_round_robin_cycles_peers_and_least_loaded_fills_the_emptiest() -> None:
    mesh = Mesh()
    for p in ("a", "b", "c"):
        mesh.peer(p, slots=10)
    ids = [mesh.submit() for _ in range(6)]
    plan = Scheduler(ROUND_ROBIN).plan(mesh.state, T0)
    assert [peer for _, peer, _ in plan] == ["a", "b", "c", "a", "b", "c"]
    assert mesh.assign([(ids[0], "a", 1), (ids[1], "a", 1)]) == ids[:2]
    plan = Scheduler().plan(mesh.state, T0)
    assert Counter(peer for _, peer, _ in plan) == {"b": 2, "c": 2}


def test_consistent_hash_moves_only_keys_of_a_leaving_or_joining_peer() -> None:
    mesh = Mesh()
    for p in ("a", "b", "c"):
        mesh.peer(p, slots=100)
    keys = [f"k{i}" for i in range(60)]

    def homes() -> dict[str, str]:
        runs = {mesh.submit(session=k, placement=CONSISTENT_HASH): k for k in keys}
        plan = Scheduler().plan(mesh.state, T0)
        mesh.assign(plan)
        return {runs[run]: peer for run, peer, _ in plan if run in runs}

    before = homes()
    assert set(before.values()) == {"a", "b", "c"} and len(before) == len(keys)
    mesh.peer("d", slots=100)
    joined = homes()
    moved = {k for k in keys if joined[k] != before[k]}
    assert moved and all(joined[k] == "d" for k in moved), "only keys taken by d move"
    mesh.apply(c.PeerDown(mesh.cid(), T0, "b", "i1"))
    left = homes()
    assert all(left[k] == joined[k] for k in keys if joined[k] != "b")


def test_consistent_hash_waits_for_its_peer_instead_of_spilling() -> None:
    mesh = Mesh()
    mesh.peer("a", slots=1)
    mesh.peer("b", slots=1)
    first = mesh.submit(session="s", placement=CONSISTENT_HASH)
    second = mesh.submit(session="s", placement=CONSISTENT_HASH)
    sched = Scheduler()
    plan = sched.plan(mesh.state, T0)
    assert [run for run, _, _ in plan] == [first]
    mesh.assign(plan)
    assert sched.plan(mesh.state, T0) == []
    waiting = sched.waiting_for(mesh.state, mesh.state.runs[second], T0)
    assert waiting is not None and waiting.code == "slot" and plan[0][1] in waiting.message


def test_waiting_for_names_labels_caps_and_backoff() -> None:
    mesh = Mesh()
    mesh.peer("cpu", slots=2, labels={"pool": "cpu"})
    mesh.apply(c.Configure(mesh.cid(), T0, {"t": 1}, None, {}, None, {"backoff_base_ms": 400}))
    gpu = mesh.submit(labels={"gpu": "a100"})
    capped = [mesh.submit(tenant="t") for _ in range(2)]
    sched = Scheduler()
    mesh.assign(sched.plan(mesh.state, T0))
    state = mesh.state
    assert sched.waiting_for(state, state.runs[gpu], T0).message == (  # type: ignore[union-attr]
        "no up peer offers labels gpu=a100"
    )
    assert sched.waiting_for(state, state.runs[capped[1]], T0).code == "tenant_cap"  # type: ignore[union-attr]
    result = mesh.apply(c.Fail(mesh.cid(), T0, capped[0], 1, "error", "boom"))
    assert result.retry is False  # max_attempts 1: a dead letter
    retried = mesh.submit(max_attempts=3)
    mesh.assign(sched.plan(mesh.state, T0))
    result = mesh.apply(c.Fail(mesh.cid(), T0, retried, 1, "timeout", "slow"))
    assert result.retry and result.not_before_ms > T0
    assert sched.waiting_for(state, state.runs[retried], T0).code == "backoff"  # type: ignore[union-attr]
    assert retried not in [r for r, _, _ in sched.plan(state, T0)]
    assert retried in [r for r, _, _ in sched.plan(state, result.not_before_ms)]


def test_backoff_grows_exponentially_within_jitter_and_is_deterministic() -> None:
    delays = [backoff_ms("run", n, 1000, 60_000) for n in range(1, 9)]
    assert delays == [backoff_ms("run", n, 1000, 60_000) for n in range(1, 9)]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(60_000, 1000 * 2 ** (n - 1))
        assert ceiling // 2 <= delay <= ceiling
    spread = {backoff_ms(f"run-{i}", 3, 1000, 60_000) for i in range(50)}
    assert len(spread) > 25, "jitter differs between runs"


def test_settings_parse_scheduling_policy_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MESH_TENANT_CAPS", "a=2,b=10")
    monkeypatch.setenv("MESH_DEFAULT_TENANT_MAX_QUEUED", "100")
    monkeypatch.setenv("MESH_RETRY_TIMEOUTS", "false")
    s = Settings.load({})
    assert s.tenant_caps == {"a": 2, "b": 10} and s.default_tenant_max_queued == 100
    assert s.replicated_policy()["retry"]["retry_timeouts"] is False
    monkeypatch.setenv("MESH_PLACEMENT", "random")
    with pytest.raises(SettingsError, match="placement"):
        Settings.load({})


def test_a_full_mesh_plans_nothing_without_ordering_the_queue() -> None:
    """Every slot taken: the plan is empty and the queue is not even read
    (the leader ticks on every applied entry); a freed slot takes the first
    run in priority order, as before."""
    mesh = Mesh()
    mesh.peer("p1", slots=1)
    first = mesh.submit(priority=1)
    low = mesh.submit(priority=0)
    high = mesh.submit(priority=5)
    assert mesh.assign(Scheduler().plan(mesh.state, T0)) == [high]
    orders: list[int] = []

    class Counting(Scheduler):
        def order(self, state: MeshState, now_ms: int) -> list[Any]:
            orders.append(now_ms)
            return super().order(state, now_ms)

    assert Counting().plan(mesh.state, T0) == []
    assert orders == [], "a full mesh does not order the queue"
    mesh.apply(c.Finish(mesh.cid(), T0, high, 1, "succeeded", None))
    assert Counting().plan(mesh.state, T0) == [(first, "p1", 1)]
    assert low in {r.id for r in mesh.state.queued()}
