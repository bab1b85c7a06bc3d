"""The HTTP layer against a stand-in PeerAPI, over real HTTP (aiohttp's test
server): routing, auth and the one error mapping, without a mesh behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from raftmesh.mesh.api import build_app
from raftmesh.mesh.auth import Authenticator
from raftmesh.mesh.errors import NoQuorumError, RunNotFound, TooManyRequests
from raftmesh.mesh.events import Frame


class StandIn:
    """Records what the routes asked for; answers as a peer would."""

    max_body_bytes = 4096
    auth = Authenticator.build("tok")
    internal_token = "internal"
    max_streams = 10
    max_streams_per_token = 10

    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.refuse: Exception | None = None

    async def submit(self, spec: dict[str, Any]) -> tuple[str, bool]:
        if self.refuse is not None:
            raise self.refuse
        self.submitted.append(spec)
        return f"run-{len(self.submitted)}", spec.get("idempotency_key") != "seen"

    async def get_run(self, run_id: str, tenant: str | None) -> dict[str, Any]:
        if run_id != "run-1":
            raise RunNotFound(f"no run with id {run_id!r} in this mesh")
        return {"id": run_id, "status": "running"}

    async def list_runs(
        self,
        status: str | None,
        limit: int,
        tenant: str | None = None,
        agent: str | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        return [
            {
                "id": "run-1",
                "status": status,
                "limit": limit,
                "tenant": tenant,
                "agent": agent,
                "offset": offset,
            }
        ]

    async def cancel_run(self, run_id: str, tenant: str | None) -> dict[str, Any]:
        return {"id": run_id, "status": "cancelling"}

    async def retry_run(self, run_id: str, tenant: str | None) -> dict[str, Any]:
        return {"id": run_id, "status": "queued"}

    async def pause_run(self, run_id: str, tenant: str | None) -> dict[str, Any]:
        return {"id": run_id, "status": "running", "pause_requested": True, "tenant": tenant}

    async def resume_run(self, run_id: str, tenant: str | None) -> dict[str, Any]:
        return {"id": run_id, "status": "queued", "tenant": tenant}

    def cluster(self) -> dict[str, Any]:
        return {"self": "p1", "leader": "p1"}

    async def readiness(self) -> tuple[bool, str]:
        return False, "no known Raft leader"

    def heartbeat(self, report: dict[str, Any]) -> dict[str, Any]:
        self.heartbeats.append(report)
        return {"leases": {}, "lease_ttl_s": 2.0}

    def metrics_text(self) -> bytes:
        return b"raftmesh_up 1\n"

    async def follow_events(self, run_id: str, after_seq: int) -> AsyncIterator[Frame]:
        yield Frame(event="progress", data={"after": after_seq}, id=after_seq + 1)

    def agents(self) -> dict[str, Any]:
        return {"peer": "p1", "agents": ["echo"]}


AUTH = {"Authorization": "Bearer tok"}


@pytest.fixture
async def api() -> AsyncIterator[tuple[TestClient, StandIn]]:
    peer = StandIn()
    client = TestClient(TestServer(build_app(peer)))
    await client.start_server()
    try:
        yield client, peer
    finally:
        await client.close()


async def test_a_submission_is_validated_then_handed_to_the_peer(api) -> None:
    client, peer = api
    resp = await client.post("/v1/runs", json={"agent": "echo", "input": [1]}, headers=AUTH)
    assert resp.status == 202
    assert await resp.json() == {"id": "run-1", "status": "queued"}
    submitted = {k: v for k, v in peer.submitted[0].items() if v is not None}
    assert submitted == {"agent": "echo", "input": [1]}
    again = await client.post(
        "/v1/runs", json={"agent": "echo", "input": 1, "idempotency_key": "seen"}, headers=AUTH
    )
    assert again.status == 200 and (await again.json())["status"] == "existing"


async def test_bad_bodies_never_reach_the_peer(api) -> None:
    client, peer = api
    cases = [
        (b"{not json", 400, "malformed_json"),
        (b'{"input": 1}', 400, "bad_request"),
        (b'{"agent": "echo", "input": 1, "colour": "red"}', 400, "bad_request"),
        (b'{"agent": "echo", "input": "' + b"x" * 5000 + b'"}', 413, "payload_too_large"),
    ]
    for body, status, code in cases:
        resp = await client.post(
            "/v1/runs", data=body, headers={**AUTH, "Content-Type": "application/json"}
        )
        assert resp.status == status, body[:40]
        assert (await resp.json())["error"]["code"] == code
    assert peer.submitted == []


async def test_every_v1_route_wants_the_token_and_the_internal_one_its_own(api) -> None:
    client, peer = api
    for method, path in [
        ("POST", "/v1/runs"),
        ("GET", "/v1/runs"),
        ("GET", "/v1/runs/run-1"),
        ("POST", "/v1/runs/run-1/cancel"),
        ("POST", "/v1/runs/run-1/retry"),
        ("POST", "/v1/runs/run-1/pause"),
        ("POST", "/v1/runs/run-1/resume"),
        ("GET", "/v1/runs/run-1/events"),
        ("GET", "/v1/cluster"),
        ("GET", "/v1/agents"),
    ]:
        resp = await client.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401, path
    resp = await client.post("/internal/v1/heartbeat", json={"id": "p2"}, headers=AUTH)
    assert resp.status == 401, "the API token is not the internal token"
    resp = await client.post(
        "/internal/v1/heartbeat",
        json={"id": "p2"},
        headers={"Authorization": "Bearer internal"},
    )
    assert resp.status == 200 and peer.heartbeats == [{"id": "p2"}]


async def test_each_run_action_reaches_its_own_peer_method(api) -> None:
    client, _ = api
    expected = {
        "cancel": {"id": "run-7", "status": "cancelling"},
        "retry": {"id": "run-7", "status": "queued"},
        "pause": {"id": "run-7", "status": "running", "pause_requested": True, "tenant": None},
        "resume": {"id": "run-7", "status": "queued", "tenant": None},
    }
    for action, view in expected.items():
        resp = await client.post(f"/v1/runs/run-7/{action}", headers=AUTH)
        assert resp.status == 202, action
        assert await resp.json() == view, action


async def test_mesh_errors_map_to_their_status_code_and_retry_hint(api) -> None:
    client, peer = api
    resp = await client.get("/v1/runs/nope", headers=AUTH)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "run_not_found"
    peer.refuse = TooManyRequests("tenant full", retry_after_s=7)
    resp = await client.post("/v1/runs", json={"agent": "echo", "input": 1}, headers=AUTH)
    assert resp.status == 429 and resp.headers["Retry-After"] == "7"
    peer.refuse = NoQuorumError("no majority")
    resp = await client.post("/v1/runs", json={"agent": "echo", "input": 1}, headers=AUTH)
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "no_quorum"
    peer.refuse = RuntimeError("bug")
    resp = await client.post("/v1/runs", json={"agent": "echo", "input": 1}, headers=AUTH)
    assert resp.status == 500
    assert "bug" not in (await resp.text()), "internal details stay in the log"


async def test_probes_and_events(api) -> None:
    client, _ = api
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["reason"] == "no known Raft leader"
    stream = await client.get("/v1/runs/run-1/events", headers={**AUTH, "Last-Event-ID": "4"})
    assert stream.status == 200
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    text = await stream.text()
    assert "id: 5" in text and "progress" in text
    missing = await client.get("/v1/runs/nope/events", headers=AUTH)
    assert missing.status == 404
