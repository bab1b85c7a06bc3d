"""``MeshState.apply`` is total: whatever a command carries, it answers.

pysyncobj retries an apply that raises on every tick, forever, on every peer,
so one command with a value nobody expected (``depth=inf``, ``nan``, an integer
wider than 64 bits) would wedge the whole mesh. These tests feed such values
as whole commands and as fields of real commands, straight to ``apply`` and
through real Raft nodes, and check that the command is refused and the state
and the log keep moving.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_raft_durability import free_ports, propose_retrying, start_nodes, wait_leader
from test_state_properties import recomputed_indexes, snapshot_roundtrip

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.errors import UnencodableCommand
from raftmesh.consensus.raft import RaftTimers
from raftmesh.consensus.state import MeshState

T0 = 1_000_000
RESULTS = tuple(res.Result.__args__)
NASTY_NUMBERS = [math.inf, -math.inf, math.nan, 2**70, -(2**70), 2**64, True, 1e308]
# Anything a decoder could hand over, and the Python values msgpack cannot carry.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.sampled_from(NASTY_NUMBERS)
    | st.text(max_size=6)
    | st.binary(max_size=6)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
SIGNAL_WAIT = {"kind": "signal", "due_ms": None, "signal": "go", "index": 0, "children": None}
RUN_FIELDS = [
    "id",
    "agent",
    "input",
    "tenant",
    "priority",
    "labels",
    "timeout_s",
    "max_attempts",
    "idempotency_key",
    "parent_id",
    "depth",
    "budget",
    "isolation",
    "memory_limit_mb",
    "session",
    "placement",
    "epoch",
    "attempts",
]


def a_mesh() -> MeshState:
    state = MeshState()
    for i, peer in enumerate(["p1", "p2"]):
        state.apply(c.PeerUp(f"up{i}", T0, peer, "i1", f"r{i}", f"h{i}", 2, {}))
    state.apply(c.Submit("s0", T0, [{"id": "r0", "agent": "echo", "input": 1}]))
    state.apply(c.Assign("a0", T0, 1, [("r0", "p1", 1)]))
    # w0 waits for a signal, so wake, signal, pause and resume have a target.
    state.apply(c.Submit("s1", T0, [{"id": "w0", "agent": "echo", "input": 1}]))
    state.apply(c.Assign("a1", T0, 1, [("w0", "p2", 1)]))
    state.apply(c.Suspend("z1", T0, "w0", 1, SIGNAL_WAIT))
    assert state.runs["w0"].status == "waiting"
    return state


def consistent(state: MeshState) -> None:
    """The indexes apply maintains still equal a recomputation from the runs."""
    by_owner, tenants = recomputed_indexes(state)
    assert {pid: ids for pid, ids in state.by_owner.items() if ids} == by_owner
    assert state.tenant_running == tenants
    queued: dict[str, int] = {}
    for run in state.runs.values():
        if run.status == "queued":
            queued[run.spec.tenant] = queued.get(run.spec.tenant, 0) + 1
    assert state.tenant_queued == queued
    for run in state.runs.values():
        if run.status in ("waiting", "paused"):
            assert run.owner is None and not run.pause_requested, run
        if run.status == "waiting":
            assert run.waiting_for is not None, run


def refused(result: Any) -> bool:
    return isinstance(result, res.Rejected)


def run_refused(result: Any) -> bool:
    """A submit answers per run: the run carries an error and no run exists."""
    if refused(result):
        return True
    return all(outcome.rejection is not None for outcome in result.runs)


@pytest.mark.parametrize("value", NASTY_NUMBERS, ids=repr)
@pytest.mark.parametrize("name", ["depth", "priority", "max_attempts", "timeout_s", "epoch"])
def test_a_run_with_an_unrepresentable_number_is_refused(name: str, value: Any) -> None:
    state = a_mesh()
    before = state.to_dict()
    result = state.apply(c.Submit("bad", T0, [{"id": "x", "agent": "echo", name: value}]))
    assert run_refused(result), result
    assert "x" not in state.runs
    after = state.to_dict()
    assert (after["runs"], after["peers"]) == (before["runs"], before["peers"])
    consistent(state)
    # and the next command applies as always
    ok = state.apply(c.Submit("good", T0, [{"id": "y", "agent": "echo", "input": 2}]))
    assert ok.ok and ok.runs[0].created, ok


@settings(max_examples=400, deadline=None)
@given(
    st.lists(VALUES | st.dictionaries(st.sampled_from(["op", "cid", "at_ms"]), VALUES), max_size=6)
)
def test_arbitrary_values_as_commands(values: list[Any]) -> None:
    state = a_mesh()
    for value in values:
        result = state.apply(value)  # must not raise
        assert refused(result), result
    consistent(state)
    assert snapshot_roundtrip(state).to_dict() == state.to_dict()


def _field_commands(data: st.DataObject, at: int) -> Any:
    """A real command of every kind with one or more of its fields replaced."""
    value = data.draw(VALUES, label="value")
    spec: dict[str, Any] = {"id": "n", "agent": "echo", "input": None}
    spec[data.draw(st.sampled_from(RUN_FIELDS), label="run field")] = value
    base = data.draw(
        st.sampled_from(
            [
                c.Submit("x", at, [spec]),
                c.Assign("x", at, 1, [("r0", "p2", 2)]),
                c.Finish("x", at, "r0", 1, "succeeded", None),
                c.Fail("x", at, "r0", 1, "error", "boom"),
                c.Release("x", at, "r0", 1),
                c.Cancel("x", at, "r0"),
                c.Settle("x", at, "r0"),
                c.PeerUp("x", at, "p3", "i1", "r3", "h3", 1, {}),
                c.PeerDown("x", at, "p2", "i1"),
                c.PeerJoin("x", at, "p4", "r4", "h4", "voter"),
                c.PeerDrain("x", at, "p2", "finish"),
                c.PeerStopping("x", at, "p2", "i1"),
                c.PeerLeave("x", at, "p2"),
                c.Configure("x", at, {"t": 1}, 2, {}, None, {"backoff_base_ms": 10}),
                c.Suspend("x", at, "r0", 1, SIGNAL_WAIT),
                c.Suspend("x", at, "r0", 1, {"kind": "timer", "due_ms": at + 5}),
                c.Suspend("x", at, "r0", 1, {"kind": "children", "children": ["w0"]}),
                c.Wake("x", at, ["w0", "r0"]),
                c.Signal("x", at, "w0", "go", 0),
                c.Pause("x", at, "w0"),
                c.Pause("x", at, "r0"),
                c.Resume("x", at, "w0"),
            ]
        ),
        label="command",
    )
    cmd = base.to_wire()
    fields = [k for k in cmd if k != "op"]
    for name in data.draw(st.lists(st.sampled_from(fields), min_size=0, max_size=3, unique=True)):
        cmd[name] = data.draw(VALUES, label=name)
    return cmd


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_arbitrary_values_as_fields_of_real_commands(data: st.DataObject) -> None:
    state = a_mesh()
    for i in range(data.draw(st.integers(1, 4))):
        cmd = _field_commands(data, T0 + i)
        cmd["cid"] = cmd["cid"] if not isinstance(cmd.get("cid"), str) else f"c{i}"
        result = state.apply(cmd)  # must not raise
        assert isinstance(result, RESULTS), result
        consistent(state)
    assert snapshot_roundtrip(state).to_dict() == state.to_dict()


async def test_every_peer_keeps_applying_after_a_bad_command(tmp_path: Path) -> None:
    """Three real Raft nodes: a command carrying ``depth=inf``, then ``nan``,
    then one no encoder can carry, then an ordinary one. The bad ones are
    refused; the ordinary one commits and every node applies it."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    nodes = start_nodes(addrs, tmp_path, RaftTimers())
    for node in nodes:
        node._commit_timeout_s = 3.0
    try:
        leader = await wait_leader(nodes)
        follower = next(n for n in nodes if n is not leader)
        for i, (name, value) in enumerate(
            [("depth", math.inf), ("timeout_s", math.nan), ("priority", 2**70)]
        ):
            bad = c.Submit(uuid.uuid4().hex, T0, [{"id": f"bad{i}", "agent": "e", name: value}])
            result = await asyncio.wait_for(propose_or_refusal(follower, bad), 10)
            assert run_refused(result), result
        good = c.Submit(uuid.uuid4().hex, T0, [{"id": "good", "agent": "echo", "input": 1}])
        result = await asyncio.wait_for(propose_retrying(leader, good), 10)
        assert result.ok and result.runs[0].created, result
        for _ in range(100):
            if all("good" in n.state.runs for n in nodes):
                break
            await asyncio.sleep(0.05)
        assert all("good" in n.state.runs for n in nodes)
        assert not any(f"bad{i}" in n.state.runs for n in nodes for i in range(3))
    finally:
        for n in nodes:
            n.close()


async def propose_or_refusal(node: Any, cmd: Any) -> Any:
    """A command that cannot be encoded is refused before it reaches the log."""
    try:
        return await propose_retrying(node, cmd)
    except UnencodableCommand as exc:
        return res.Rejected(res.Rejection.MALFORMED, str(exc))


def test_the_last_guard_refuses_what_no_check_foresaw(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler bug (here: a settle that raises) costs that one command, not
    the log: it is refused as INTERNAL, remembered, and the next one applies."""
    state = a_mesh()

    def broken(self: MeshState, cmd: c.Settle, at_ms: int) -> res.Result:
        raise OverflowError("no check foresaw this")

    monkeypatch.setitem(MeshState._handlers, c.Op.SETTLE, broken)
    result = state.apply(c.Settle("s", T0, "r0"))
    assert isinstance(result, res.Rejected), result
    assert result.reason == res.Rejection.INTERNAL and "no check foresaw" in result.message
    assert state.apply(c.Settle("s", T0, "r0")) == result, "a retry gets the same answer"
    assert state.apply(c.Cancel("c", T0, "r0")).ok
    consistent(state)


def test_a_decode_failure_is_typed_and_keeps_its_cause() -> None:
    with pytest.raises(c.CommandDecodeError) as caught:
        c.decode_bytes(b"\xc1")
    assert caught.value.__cause__ is not None
    with pytest.raises(UnencodableCommand) as too_wide:
        c.Submit("x", T0, [{"id": "r", "agent": "a", "priority": 2**70}]).encode()
    assert isinstance(too_wide.value.__cause__, OverflowError)
