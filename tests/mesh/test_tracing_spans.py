"""The span structure of a run that changed owners, in one process, with the
SDK's in-memory exporter.

Each peer has its own TracerProvider (as its own process would); the run goes
through the replicated state (Submit, Assign, PeerDown, Assign again) and a
real PostgreSQL store behind the peer's TimedStore, and each owner runs it with
``run_attempt`` as a peer does. The first owner is cut off mid-step and fenced
by the second one's claim; its spans and the second owner's land in the trace
the submit span started, because the run carries that span's traceparent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from raftmesh.consensus import commands as c
from raftmesh.consensus.results import Assigned
from raftmesh.consensus.spec import RunSpec
from raftmesh.consensus.state import MeshState
from raftmesh.mesh import logs
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.timed_store import TimedStore
from raftmesh.mesh.tracing import Tracing, traced_attempt
from raftmesh.runner.attempt import FENCED, RETRY, SUCCEEDED, Assignment, Outcome, run_attempt
from raftmesh.runner.context import RunContext
from raftmesh.runner.registry import Registry
from raftmesh.storage import Store, open_store

PG_URL = os.environ.get("RAFTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
RUN_ID = "run-traced"
STEPS = 5
CUT_AT = 2


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    schema = f"t_{uuid.uuid4().hex}"
    s = open_store(f"{PG_URL}?schema={schema}")
    await s.open()
    yield s
    await s.close()
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def clock() -> int:
    return int(time.time() * 1000)


class Peers:
    """One tracer per peer, all exporting to one in-memory exporter."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self._providers: list[TracerProvider] = []

    def tracing(self, peer_id: str) -> Tracing:
        provider = TracerProvider(resource=Resource({"service.instance.id": peer_id}))
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self._providers.append(provider)
        return Tracing(peer_id, provider)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


def up(state: MeshState, peer_id: str) -> None:
    cmd = c.PeerUp(f"up-{peer_id}", clock(), peer_id, "i1", f"r-{peer_id}", "h", 2, {})
    assert state.apply(cmd).ok


def assign(state: MeshState, owner: Tracing, epoch: int) -> Assignment:
    """The leader's Assign applied; the owner traces it as a peer does on
    every batch it applies (Peer._on_raft_change)."""
    cmd = c.Assign(f"assign-{epoch}", clock(), 1, [(RUN_ID, owner.peer_id, epoch)])
    result = state.apply(cmd)
    assert isinstance(result, Assigned) and result.accepted == [RUN_ID], result
    owner.assigned([cmd.to_wire()], [result], state)
    return Assignment.of(state.runs[RUN_ID])


async def test_a_run_taken_over_mid_run_is_one_trace_with_both_owners_steps_in_order(
    store: Store,
) -> None:
    peers = Peers()
    api, first, second = (peers.tracing(p) for p in ("peer-api", "peer-a", "peer-b"))
    cut = asyncio.Event()
    never = asyncio.Event()

    async def work(ctx: RunContext, index: int) -> int:
        if ctx.epoch == 1 and index == CUT_AT:
            cut.set()
            await never.wait()  # the first owner is cut off here, mid-step
        return index

    async def staged(ctx: RunContext, input: Any) -> str:
        for i in range(STEPS):
            await ctx.step(f"step-{i}", work, ctx, i)
        return "done"

    registry = Registry()
    registry.add("staged", staged)

    # The submission, as MeshService.submit does it: the run's spec carries
    # the submit span's traceparent into the replicated state.
    state = MeshState()
    with api.span("raftmesh.run.submit", {"agent": "staged"}):
        spec = RunSpec("staged", trace_parent=api.traceparent())
        assert state.apply(c.Submit("submit", clock(), [{"id": RUN_ID, **spec.to_wire()}])).ok
    up(state, "peer-a")
    up(state, "peer-b")

    async def attempt(tracing: Tracing, job: Assignment) -> str:
        timed = TimedStore(store, Metrics(), tracing)
        outcome = await traced_attempt(
            tracing,
            job,
            lambda: run_attempt(
                job,
                peer_id=tracing.peer_id,
                store=timed,
                registry=registry,
                clock_ms=clock,
                spans=tracing,
            ),
        )
        return outcome.status

    cut_off = asyncio.create_task(attempt(first, assign(state, first, 1)))
    await asyncio.wait_for(cut.wait(), 30)
    assert state.apply(c.PeerDown("down", clock(), "peer-a", "i1")).ok
    assert await attempt(second, assign(state, second, 2)) == SUCCEEDED
    never.set()  # the cut-off owner wakes up to a newer epoch: fenced
    assert await asyncio.wait_for(cut_off, 30) == FENCED

    spans = peers.spans()
    submit = one(spans, "raftmesh.run.submit")
    trace_id = submit.context.trace_id
    assert {s.context.trace_id for s in spans} == {trace_id}, "one trace"

    attempts = {peer_of(s): s for s in spans if s.name == "raftmesh.attempt"}
    assert set(attempts) == {"peer-a", "peer-b"}
    for owner, span in attempts.items():
        assert span.parent is not None and span.parent.span_id == submit.context.span_id, owner
    assert attempts["peer-a"].attributes["raftmesh.epoch"] == 1
    assert attempts["peer-b"].attributes["raftmesh.epoch"] == 2
    assigns = [s for s in spans if s.name == "raftmesh.run.assign"]
    assert sorted((peer_of(s), s.attributes["raftmesh.epoch"]) for s in assigns) == [
        ("peer-a", 1),
        ("peer-b", 2),
    ], "each owner traced its own assignment"
    assert all(s.parent is not None and s.parent.span_id == submit.context.span_id for s in assigns)

    steps = sorted((s for s in spans if s.name == "raftmesh.step"), key=lambda s: s.start_time)
    done = [s for s in steps if s.status.status_code != StatusCode.ERROR]
    assert [(peer_of(s), s.attributes["raftmesh.step_seq"]) for s in done] == [
        ("peer-a", 0),
        ("peer-a", 1),
        ("peer-b", 2),
        ("peer-b", 3),
        ("peer-b", 4),
    ], "each step ran once, in order; the second owner replayed 0 and 1 without a span"
    fenced = [s for s in steps if s.status.status_code == StatusCode.ERROR]
    assert [(peer_of(s), s.attributes["raftmesh.step_seq"]) for s in fenced] == [("peer-a", 2)]
    for step in steps:
        assert step.parent is not None
        assert step.parent.span_id == attempts[peer_of(step)].context.span_id
        writes = children(spans, step, "raftmesh.checkpoint.write")
        assert len(writes) == 1 and peer_of(writes[0]) == peer_of(step)

    for span in attempts.values():
        claims = children(spans, span, "raftmesh.run.claim")
        assert [claim.attributes["raftmesh.epoch"] for claim in claims] == [
            span.attributes["raftmesh.epoch"]
        ]
    results = children(spans, attempts["peer-b"], "raftmesh.run.result")
    assert [r.attributes["raftmesh.status"] for r in results] == [SUCCEEDED]
    assert attempts["peer-a"].attributes["raftmesh.outcome"] == FENCED


async def test_an_attempt_that_failed_is_a_failed_span_and_a_fenced_one_is_not() -> None:
    peers = Peers()
    tracing = peers.tracing("peer-a")
    for epoch, outcome in enumerate((Outcome(RETRY, "boom", "error"), Outcome(FENCED, "newer")), 1):
        job = Assignment(run_id=RUN_ID, epoch=epoch, attempt=epoch, spec=RunSpec("staged"))
        assert await traced_attempt(tracing, job, lambda o=outcome: _done(o)) == outcome
    retried, fenced = sorted(peers.spans(), key=lambda s: s.attributes["raftmesh.epoch"])
    assert retried.status.status_code == StatusCode.ERROR and retried.status.description == "boom"
    assert retried.attributes["raftmesh.outcome"] == RETRY
    assert fenced.status.status_code == StatusCode.UNSET


async def _done(outcome: Outcome) -> Outcome:
    return outcome


def test_a_run_without_a_trace_context_starts_its_own_trace() -> None:
    """A run submitted while tracing was off: its attempt is a root span, not a
    child of whatever span happened to be current on the peer."""
    peers = Peers()
    tracing = peers.tracing("peer-a")
    with tracing.span("raftmesh.unrelated", {}), tracing.run_span("raftmesh.attempt", None, {}):
        pass
    attempt = one(peers.spans(), "raftmesh.attempt")
    unrelated = one(peers.spans(), "raftmesh.unrelated")
    assert attempt.parent is None
    assert attempt.context.trace_id != unrelated.context.trace_id


def test_log_lines_written_in_an_attempt_carry_the_runs_trace_id() -> None:
    peers = Peers()
    api, tracing = peers.tracing("peer-api"), peers.tracing("peer-a")
    with api.span("raftmesh.run.submit", {}):
        parent = api.traceparent()
    assert parent is not None
    with tracing.run_span("raftmesh.attempt", parent, {}):
        during = logs.trace_id.get()
    assert during == parent.split("-")[1] and logs.trace_id.get() is None


def test_without_tracing_nothing_is_carried() -> None:
    off = Tracing("peer-a")
    assert not off.enabled
    with off.span("raftmesh.run.submit", {}), off.run_span("raftmesh.attempt", None, {}):
        assert off.traceparent() is None


def test_a_missing_extra_is_a_one_line_hint_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.asyncpg", None)
    with caplog.at_level(logging.WARNING, "raftmesh.tracing"):
        tracing = Tracing("peer-a")
    assert not tracing.enabled
    [record] = caplog.records
    assert record.exc_info is None and "\n" not in record.getMessage()
    assert "opentelemetry.instrumentation.asyncpg is not installed" in record.getMessage()
    assert "pip install 'raftmesh[otel]'" in record.getMessage()


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def children(spans: list[ReadableSpan], parent: ReadableSpan, name: str) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.name == name and s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def peer_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.instance.id"])
