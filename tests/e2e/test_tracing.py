"""Traces over OTLP from real peers: a chat run whose owner is killed -9 in
the middle of a model call is one trace, the trace of the request that
submitted it, holding both owners' spans and its steps in order.

The collector is a small OTLP/HTTP receiver in the test, decoding with
opentelemetry-proto what the peers' exporters really send. The peers export in
batches every 100 ms; the test waits until the first owner's finished spans
have arrived before it kills it (its open spans, the attempt and the step in
flight, die with it: a span is exported only once it ends)."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from chat_stub import MODEL, ChatStub
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from support import MakeMesh, eventually

from raftmesh.mesh.client import MeshClient
from raftmesh.storage import Store

pytestmark = pytest.mark.slow

SERVER = "opentelemetry.instrumentation.aiohttp_server"
CLIENT = "opentelemetry.instrumentation.aiohttp_client"
ASYNCPG = "opentelemetry.instrumentation.asyncpg"
E2E_DIR = Path(__file__).resolve().parent  # probe_agents, for the signal test


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    peer: str
    scope: str
    attrs: dict[str, Any]
    error: bool


class Collector:
    """An OTLP/HTTP trace receiver: what the peers export, decoded."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._receive)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def _receive(self, request: web.Request) -> web.Response:
        req = pb.ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        for resource_spans in req.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        Span(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            start_ns=span.start_time_unix_nano,
                            peer=str(resource.get("service.instance.id")),
                            scope=scope.scope.name,
                            attrs={a.key: _value(a.value) for a in span.attributes},
                            error=span.status.code == span.status.STATUS_CODE_ERROR,
                        )
                    )
        return web.Response(
            body=pb.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def of_trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    await c.start()
    yield c
    await c.close()


async def test_a_run_whose_owner_was_killed_is_one_trace_with_both_owners_steps_in_order(
    make_mesh: MakeMesh, collector: Collector, open_mesh_store: Any
) -> None:
    stub = ChatStub(fail_first=1, hold_turn=1)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "MESH_CHAT_BASE_URL": await stub.start(),
        "MESH_CHAT_MODEL": MODEL,
        "MESH_CHAT_API_KEY": "stub-key",
    }
    try:
        mesh = await make_mesh("postgres", env=env)
        store: Store = await open_mesh_store(mesh)
        # The client's own trace: the run's spans must continue it.
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        prompt = f"What is 6*7, and how many words are in the sentence? ({os.getpid()})"
        body = {"agent": "chat", "input": {"prompt": prompt, "tools": ["calculator", "word_count"]}}
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{mesh.url('peer-3')}/v1/runs",
                json=body,
                headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
            ) as resp,
        ):
            assert resp.status < 300, await resp.text()
            run_id = (await resp.json())["id"]

        await asyncio.wait_for(stub.held.wait(), 60)  # the owner's second model call
        async with MeshClient(mesh.url("peer-3")) as client:
            victim = (await client.get_run(run_id))["owner"]

        async def victims_finished_spans() -> bool:
            seen = [(s.name, s.peer) for s in collector.of_trace(trace_id)]
            return (
                ("raftmesh.run.submit", "peer-3") in seen
                and ("raftmesh.run.assign", victim) in seen
                and seen.count(("raftmesh.step", victim)) == 3
            )

        await eventually(victims_finished_spans, 30, "the first owner's three finished steps")
        mesh.kill(victim)
        survivor = next(p.id for p in mesh.peers if p.id != victim)

        async def second_call_in_flight() -> bool:
            return stub.calls(prompt, 1) == 2

        await eventually(second_call_in_flight, 60, "the new owner's model call")
        stub.release.set()
        async with MeshClient(mesh.url(survivor)) as client:
            done = await client.wait(run_id, timeout_s=60)
        assert done["status"] == "succeeded" and done["owner"] != victim, done
        owner = done["owner"]

        async def survivors_attempt() -> list[Span] | None:
            spans = collector.of_trace(trace_id)
            ended = any(s.name == "raftmesh.attempt" and s.peer == owner for s in spans)
            return spans if ended else None

        spans = await eventually(survivors_attempt, 30, "the new owner's attempt span")
    finally:
        await stub.stop()

    by_id = {s.span_id: s for s in spans}

    def named(name: str, peer: str | None = None) -> list[Span]:
        return [s for s in spans if s.name == name and peer in (None, s.peer)]

    def children(parent: Span, name: str | None = None, scope: str | None = None) -> list[Span]:
        return [
            s
            for s in spans
            if s.parent_id == parent.span_id and name in (None, s.name) and scope in (None, s.scope)
        ]

    # Every span about the run, from any peer, is in the client's trace.
    about_run = {s.trace_id for s in collector.spans if s.attrs.get("raftmesh.run_id") == run_id}
    assert about_run == {trace_id}

    # The HTTP submit: the server instrumentation's span continues the
    # client's, the submit span and its Raft commit hang under it.
    [submit] = named("raftmesh.run.submit")
    server = by_id[submit.parent_id]
    assert server.scope == SERVER and server.parent_id == client_span and server.peer == "peer-3"
    assert submit.attrs["raftmesh.run_id"] == run_id and submit.attrs["raftmesh.created"] is True
    assert [c.attrs["raftmesh.op"] for c in children(submit, "raftmesh.raft.commit")] == ["submit"]

    # Both assignments, each traced by its owner as it applied it, are
    # children of the submit span.
    assigns = {s.attrs["raftmesh.epoch"]: s for s in named("raftmesh.run.assign")}
    assert {e: (s.attrs["raftmesh.owner"], s.peer) for e, s in assigns.items()} == {
        1: (victim, victim),
        2: (owner, owner),
    }
    assert {s.parent_id for s in assigns.values()} == {submit.span_id}

    # The new owner's attempt is a child of the submit span too; the killed
    # owner's attempt never ended, so only its children tell of it.
    [attempt] = named("raftmesh.attempt")
    assert attempt.peer == owner and attempt.parent_id == submit.span_id
    assert attempt.attrs["raftmesh.epoch"] == 2 and attempt.attrs["raftmesh.outcome"] == "succeeded"
    [lost_attempt] = {s.parent_id for s in named("raftmesh.run.claim", victim)}
    assert lost_attempt not in by_id

    # The steps, in order: three by the killed owner, the last by the new one
    # (which replayed the first three without running them again).
    steps = sorted(named("raftmesh.step"), key=lambda s: s.start_ns)
    assert [
        (s.peer, s.attrs["raftmesh.step_seq"], s.attrs["raftmesh.step_name"]) for s in steps
    ] == [
        (victim, 0, "model"),
        (victim, 1, "tool:calculator"),
        (victim, 2, "tool:word_count"),
        (owner, 3, "model"),
    ]
    assert [s.parent_id for s in steps] == [lost_attempt] * 3 + [attempt.span_id]
    journal = await store.load_steps(run_id)
    assert [(s.seq, s.name, s.epoch) for s in journal] == [
        (s.attrs["raftmesh.step_seq"], s.attrs["raftmesh.step_name"], s.attrs["raftmesh.epoch"])
        for s in steps
    ]

    # Each model call and tool call has its span in its step; a model call's
    # HTTP tries are the aiohttp client instrumentation's spans (a 429, then
    # the answer), each checkpoint write holds asyncpg's spans.
    calls = [children(s, "raftmesh.chat.model") + children(s, "raftmesh.chat.tool") for s in steps]
    assert [len(c) for c in calls] == [1, 1, 1, 1]
    model_0, tool_1, tool_2, model_3 = (c[0] for c in calls)
    assert [m.attrs["raftmesh.turn"] for m in (model_0, model_3)] == [0, 1]
    assert [t.attrs["raftmesh.tool"] for t in (tool_1, tool_2)] == ["calculator", "word_count"]
    tries = sorted(children(model_0, scope=CLIENT), key=lambda s: s.start_ns)
    assert [status_of(t) for t in tries] == [429, 200]
    assert [status_of(t) for t in children(model_3, scope=CLIENT)] == [200]
    for step in steps:
        [write] = children(step, "raftmesh.checkpoint.write")
        assert children(write, scope=ASYNCPG), "the checkpoint write's queries"
    [result] = children(attempt, "raftmesh.run.result")
    assert result.attrs["raftmesh.status"] == "succeeded"

    # The peers' own traffic all along (heartbeats to the leader, storage
    # polls) made no trace: client and query spans exist only inside one,
    # and the server dropped its spans of the untraced heartbeats.
    assert all(s.parent_id for s in collector.spans if s.scope in (CLIENT, ASYNCPG))
    assert path_of(server) == "/v1/runs"
    served = {path_of(s) for s in collector.spans if s.scope == SERVER}
    assert f"/v1/runs/{run_id}" in served and "/internal/v1/heartbeat" not in served


def status_of(span: Span) -> Any:
    """The HTTP status of a client span, by either semantic convention."""
    return span.attrs.get("http.response.status_code", span.attrs.get("http.status_code"))


def path_of(span: Span) -> Any:
    """The path a server span served, by either semantic convention."""
    return span.attrs.get("url.path", span.attrs.get("http.target"))


async def test_a_signal_is_a_span_in_the_senders_trace_holding_its_commit(
    make_mesh: MakeMesh, collector: Collector, tmp_path: Path
) -> None:
    """The signal route's span (``raftmesh.signal``, with the run id and the
    signal's name) continues the client's trace, as a submission's does."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "PYTHONPATH": str(E2E_DIR),
        "MESH_AGENT_MODULES": "probe_agents",
    }
    mesh = await make_mesh("postgres", env=env)
    waits = [{"signal": "go"}]
    async with MeshClient(mesh.url("peer-1")) as client:
        body = {"log": str(tmp_path / "witness.log"), "waits": waits}
        run_id = (await client.submit("probe_wait", body))["id"]

        async def waiting() -> bool:
            return (await client.get_run(run_id))["status"] == "waiting"

        await eventually(waiting, 60, "the run to wait for its signal")
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{mesh.url('peer-2')}/v1/runs/{run_id}/signals/go",
                json={"data": 1},
                headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
            ) as resp,
        ):
            assert resp.status == 202, await resp.text()
        done = await client.wait(run_id, timeout_s=60)
        assert done["status"] == "succeeded", done

    async def signal_spans() -> list[Span] | None:
        spans = collector.of_trace(trace_id)
        return spans if any(s.name == "raftmesh.signal" for s in spans) else None

    spans = await eventually(signal_spans, 30, "the signal's span")
    by_id = {s.span_id: s for s in spans}
    [signal] = [s for s in spans if s.name == "raftmesh.signal"]
    assert signal.peer == "peer-2" and not signal.error
    assert {k: signal.attrs.get(f"raftmesh.{k}") for k in ("run_id", "name", "seq")} == {
        "run_id": run_id,
        "name": "go",
        "seq": 0,
    }
    server = by_id[signal.parent_id]
    assert server.scope == SERVER and server.parent_id == client_span
    commits = [
        s for s in spans if s.parent_id == signal.span_id and s.name == "raftmesh.raft.commit"
    ]
    assert [s.attrs["raftmesh.op"] for s in commits] == ["signal"]
