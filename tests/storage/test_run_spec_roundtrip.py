"""One RunSpec from submission to retry: every field survives the trip through
the replicated state, a real store (SQLite and PostgreSQL) and the retry path."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.spec import PLACEMENTS, SPEC_FIELDS, RunSpec, SpecError
from raftmesh.consensus.state import MeshState
from raftmesh.mesh.service import resubmission
from raftmesh.runner.attempt import Assignment
from raftmesh.runner.context import BUDGET_KEYS
from raftmesh.runner.isolation import ISOLATION_MODES
from raftmesh.storage import Store

# What the API can deliver: JSON strings are UTF-8, and NUL is refused.
CHARS = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))
text = st.text(CHARS, max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
specs = st.builds(
    RunSpec,
    agent=st.text(CHARS, min_size=1, max_size=20),
    input=json_values,
    tenant=st.text(CHARS, min_size=1, max_size=20),
    priority=st.integers(-(2**31), 2**31 - 1),
    labels=st.dictionaries(st.text(CHARS, min_size=1, max_size=8), text, max_size=3),
    timeout_s=st.none() | st.floats(min_value=0.001, max_value=1e9),
    max_attempts=st.integers(1, 2**31 - 1),
    idempotency_key=st.none() | text,
    parent_id=st.none() | text,
    depth=st.integers(0, 50),
    budget=st.none() | st.dictionaries(st.sampled_from(BUDGET_KEYS), st.integers(0, 2**63 - 1)),
    isolation=st.sampled_from(ISOLATION_MODES),
    memory_limit_mb=st.none() | st.integers(16, 2**31 - 1),
    session=st.none() | text,
    placement=st.none() | st.sampled_from(PLACEMENTS),
    trace_parent=st.none() | st.from_regex(r"\A00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]\Z"),
)


def submitted(state: MeshState, entry: dict[str, object], cid: str) -> RunSpec:
    result = state.apply(c.Submit(cid, 1_000, [entry]))
    assert isinstance(result, res.Submitted) and result.runs[0].created, result
    return state.runs[str(entry["id"])].spec


async def roundtrip(store: Store, spec: RunSpec, n: int) -> None:
    run_id = f"run-{n}"
    first = MeshState()
    assert submitted(first, {"id": run_id, **spec.to_wire()}, "a") == spec
    job = Assignment.of(first.runs[run_id])
    assert job.spec == spec
    await store.claim(job.row(), 1, "p1", 2_000)
    await store.put_result(run_id, 1, "failed", None, "boom", 3_000)
    row = await store.get_run(run_id)
    assert row is not None and row.status == "failed"
    again = MeshState()
    assert submitted(again, resubmission(row), "b") == spec
    assert again.runs[run_id].epoch == 1, "the next owner claims epoch 2"


async def test_every_run_field_survives_submit_storage_and_retry(store: Store) -> None:
    loop = asyncio.get_running_loop()
    count = iter(range(10**6))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(specs)
    def check(spec: RunSpec) -> None:
        asyncio.run_coroutine_threadsafe(roundtrip(store, spec, next(count)), loop).result(30)

    await asyncio.to_thread(check)


def test_the_wire_form_is_checked_field_by_field() -> None:
    spec = RunSpec("echo", input={"a": 1}, budget={"tokens": 3}, isolation="process")
    assert RunSpec.from_wire(spec.to_wire()) == spec
    assert RunSpec.from_wire({"agent": "echo", "priority": None}) == RunSpec("echo")
    for bad in (
        {"agent": ""},
        {"agent": "echo", "tenant": ""},
        {"agent": "echo", "tenant": "a\x00b"},
        {"agent": "echo", "session": "\ud800"},
        {"agent": "echo", "priority": 2**70},
        {"agent": "echo", "depth": float("inf")},
        {"agent": "echo", "timeout_s": float("nan")},
        {"agent": "echo", "max_attempts": True},
        {"agent": "echo", "labels": {"a": 1}},
        {"agent": "echo", "trace_parent": "00-trace-span-01"},
        {"agent": "echo", "colour": "red"},
        {"input": 1},
        ["echo"],
    ):
        with pytest.raises(SpecError):
            RunSpec.from_wire(bad)


def test_every_field_but_the_input_has_its_check() -> None:
    from raftmesh.consensus import spec as module

    assert set(module._CHECKS) == set(SPEC_FIELDS) - {"input"}
    assert {f.name for f in dataclasses.fields(RunSpec)} == set(SPEC_FIELDS)
