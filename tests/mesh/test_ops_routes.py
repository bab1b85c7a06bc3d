"""The operator routes (diagnostics, steps, the web UI) over real HTTP against
a stand-in peer, and the run list's new filters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_api_routes import AUTH, StandIn

from raftmesh.mesh import logs
from raftmesh.mesh.api import build_app
from raftmesh.mesh.auth import Authenticator, Principal, token_digest
from raftmesh.mesh.ops_api import add_ops_routes

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class OpsStandIn(StandIn):
    def __init__(self) -> None:
        super().__init__()
        self.traces: list[str | None] = []

    async def diagnostics(self) -> dict[str, Any]:
        self.traces.append(logs.trace_id.get())
        return {"peer": "p1", "status": "pass", "checks": [], "notes": []}

    async def run_steps(self, run_id: str, tenant: str | None) -> dict[str, Any]:
        return {"id": run_id, "steps": [], "owners": []}


@pytest.fixture
async def ops() -> AsyncIterator[tuple[TestClient, OpsStandIn]]:
    peer = OpsStandIn()
    app = build_app(peer)
    add_ops_routes(app, peer)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, peer
    finally:
        await client.close()


async def test_runs_are_filtered_by_tenant_and_agent_and_paged(ops) -> None:
    client, _ = ops
    resp = await client.get("/v1/runs?tenant=acme&agent=echo&offset=50&limit=5", headers=AUTH)
    assert resp.status == 200
    (listed,) = (await resp.json())["runs"]
    assert (listed["tenant"], listed["agent"], listed["offset"], listed["limit"]) == (
        "acme",
        "echo",
        50,
        5,
    )
    for bad in ("x", "-1", "1000001"):
        resp = await client.get(f"/v1/runs?offset={bad}", headers=AUTH)
        assert resp.status == 400, bad
        assert "offset" in (await resp.json())["error"]["message"]


async def test_diagnostics_and_steps_want_the_token(ops) -> None:
    client, _ = ops
    for path in ("/v1/diagnostics", "/v1/runs/run-1/steps"):
        assert (await client.get(path)).status == 401, path
        resp = await client.get(path, headers=AUTH)
        assert resp.status == 200, path
    assert (await (await client.get("/v1/diagnostics", headers=AUTH)).json())["status"] == "pass"


async def test_the_ui_needs_no_token_and_says_whether_the_api_does(ops) -> None:
    client, _ = ops
    page = await client.get("/ui/")
    assert page.status == 200 and page.content_type == "text/html"
    assert 'data-token-required="1"' in await page.text()
    redirect = await client.get("/ui", allow_redirects=False)
    assert redirect.status == 302 and redirect.headers["Location"] == "/ui/"
    script = await client.get("/ui/static/app.js")
    assert script.status == 200 and "Authorization" in await script.text()
    assert (await client.get("/ui/static/nope.js")).status == 404


async def test_a_requests_traceparent_reaches_the_log_context(ops) -> None:
    client, peer = ops
    headers = {**AUTH, "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}
    await client.get("/v1/diagnostics", headers=headers)
    await client.get("/v1/diagnostics", headers=AUTH)
    assert peer.traces == [TRACE, None]


async def test_a_nul_in_a_run_list_filter_is_a_400(ops) -> None:
    """Found by schemathesis: it reached PostgreSQL and came back a 500."""
    client, peer = ops
    for name in ("status", "tenant", "agent"):
        resp = await client.get(f"/v1/runs?{name}=a%00b", headers=AUTH)
        assert resp.status == 400, name
        assert "NUL" in (await resp.json())["error"]["message"]


async def test_whoami_says_what_the_token_acts_as() -> None:
    peer = OpsStandIn()
    tenant_digest = token_digest("acme-tok")
    peer.auth = Authenticator(
        {
            token_digest("tok"): Principal(admin=True, tenant=None, key="a"),
            tenant_digest: Principal(admin=False, tenant="acme", key=tenant_digest),
        }
    )
    app = build_app(peer)
    add_ops_routes(app, peer)
    async with TestClient(TestServer(app)) as client:
        admin = await client.get("/v1/whoami", headers=AUTH)
        assert (admin.status, await admin.json()) == (200, {"admin": True, "tenant": None})
        tenant = await client.get("/v1/whoami", headers={"Authorization": "Bearer acme-tok"})
        assert (tenant.status, await tenant.json()) == (200, {"admin": False, "tenant": "acme"})
        assert (await client.get("/v1/whoami")).status == 401
        refused = await client.get("/v1/whoami", headers={"Authorization": "Bearer other"})
        assert refused.status == 401
