"""Traces over OTLP: a run's spans from every peer that touched it form one
trace whose id is the run id, across a kill -9 of its owner. The collector is
a small OTLP/HTTP receiver in the test, decoding what the peers really send."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from conftest import MakeMesh
from support import eventually

from raftmesh.mesh.client import MeshClient

pb = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

pytestmark = pytest.mark.slow


class Collector:
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
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
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attrs = {}
                    for a in span.attributes:
                        v = a.value
                        attrs[a.key] = v.string_value if v.HasField("string_value") else v.int_value
                    self.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "peer": resource.get("service.instance.id"),
                            "attrs": attrs,
                        }
                    )
        return web.Response(
            body=pb.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    await c.start()
    yield c
    await c.close()


async def test_a_runs_spans_from_every_peer_share_its_trace(
    make_mesh: MakeMesh, collector: Collector
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    mesh = await make_mesh("postgres", 3, env=env)
    async with MeshClient(mesh.url("peer-1")) as client:
        run = await client.submit("steps", {"steps": 10, "step_seconds": 0.3})
        run_id = run["id"]

        async def checkpointed() -> dict[str, Any] | None:
            view = await client.get_run(run_id)
            steps = (await client.steps(run_id))["steps"]
            return view if view["status"] == "running" and len(steps) >= 2 else None

        first = await eventually(checkpointed, 20, "two checkpointed steps")
        survivor = next(p.id for p in mesh.peers if p.id != first["owner"])
        # Let the owner's batch (every 200 ms) carry its first spans out.
        await eventually(
            lambda: _some(collector, run_id, "raftmesh.checkpoint.write", first["owner"]),
            10,
            "the first owner's checkpoint spans",
        )
        mesh.kill(first["owner"])

    async with MeshClient(mesh.url(survivor)) as client:
        done = await client.wait(run_id, timeout_s=60)
    assert done["status"] == "succeeded" and done["owner"] != first["owner"]

    async def complete() -> list[dict[str, Any]] | None:
        mine = [s for s in collector.spans if s["trace_id"] == run_id]
        names = {s["name"] for s in mine}
        wanted = {"raftmesh.run.submit", "raftmesh.run.claim", "raftmesh.step"}
        wanted |= {"raftmesh.checkpoint.write", "raftmesh.run.result"}
        return mine if wanted <= names else None

    spans = await eventually(complete, 15, "every kind of span of the run")
    peers = {s["peer"] for s in spans}
    assert {first["owner"], done["owner"]} <= peers
    epochs = {s["attrs"].get("raftmesh.epoch") for s in spans if s["name"] == "raftmesh.run.claim"}
    assert {1, 2} <= epochs
    assert all(s["attrs"]["raftmesh.run_id"] == run_id for s in spans)
    assert {
        s["trace_id"] for s in collector.spans if s["attrs"].get("raftmesh.run_id") == run_id
    } == {run_id}


async def _some(collector: Collector, run_id: str, name: str, peer: str | None) -> bool:
    return any(
        s["trace_id"] == run_id and s["name"] == name and s["peer"] == peer for s in collector.spans
    )
