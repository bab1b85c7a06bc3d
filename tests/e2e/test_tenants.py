"""Tenants end to end (issue 10, findings 5 and 13): a 3-peer mesh on
PostgreSQL with a tokens file and TLS; two tenants, each with its own token,
through every run endpoint, and the admin-only routes."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest

from raftmesh.chaos.secure import SecureSetup, make_secure_setup
from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.mesh.devmesh import DevMesh

pytestmark = pytest.mark.slow


async def _status(call: object) -> int:
    try:
        await call  # type: ignore[misc]
    except MeshHTTPError as exc:
        return exc.status
    return 200


async def _secure_mesh(make_mesh, tmp_path: Path) -> tuple[DevMesh, SecureSetup]:
    setup = make_secure_setup(tmp_path / "secure")
    mesh = await make_mesh("postgres", env=setup.peer_env())
    return mesh, setup


async def test_two_tenants_see_only_their_own_runs(make_mesh, tmp_path):
    mesh, setup = await _secure_mesh(make_mesh, tmp_path)
    assert mesh.peers[0].url.startswith("https://")
    urls = [p.url for p in mesh.peers]
    alpha = MeshClient(urls[0], setup.tenant_tokens["alpha"], ca=str(setup.ca))
    beta = MeshClient(urls[1], setup.tenant_tokens["beta"], ca=str(setup.ca))
    admin = MeshClient(urls[2], setup.admin_token, ca=str(setup.ca))
    try:
        # One idempotency key, two tenants: two runs, neither learns the other's id.
        a_run = await alpha.submit(
            "steps", {"steps": 30, "step_seconds": 0.2}, idempotency_key="order-42"
        )
        b_run = await beta.submit(
            "steps", {"steps": 1, "step_seconds": 0.01}, idempotency_key="order-42"
        )
        assert a_run["status"] == b_run["status"] == "queued"
        assert a_run["id"] != b_run["id"]
        again = await alpha.submit("steps", {"steps": 1}, idempotency_key="order-42")
        assert again == {"id": a_run["id"], "status": "existing"}
        assert (await alpha.get_run(a_run["id"]))["tenant"] == "alpha"

        # A tenant token submits as its tenant only.
        with pytest.raises(MeshHTTPError) as refused:
            await beta.submit("steps", {"steps": 1}, tenant="alpha")
        assert refused.value.status == 403 and "alpha" in refused.value.message
        named = await beta.submit("steps", {"steps": 1, "step_seconds": 0.01}, tenant="beta")
        assert (await beta.get_run(named["id"]))["tenant"] == "beta"

        # Another tenant's run does not exist, on every run endpoint.
        a_id = a_run["id"]
        assert await _status(beta.get_run(a_id)) == 404
        assert await _status(beta.cancel(a_id)) == 404
        assert await _status(beta.retry(a_id)) == 404
        with pytest.raises(MeshHTTPError) as stream:
            async for _ in beta.events(a_id):
                pass
        assert stream.value.status == 404
        listed = {r["id"] for r in (await beta.list_runs())["runs"]}
        assert a_id not in listed and b_run["id"] in listed
        assert {r["tenant"] for r in (await beta.list_runs())["runs"]} == {"beta"}
        assert {r["id"] for r in (await admin.list_runs())["runs"]} >= {a_id, b_run["id"]}

        # Their own runs, through every run endpoint.
        seen = []
        async for msg in beta.events(b_run["id"]):
            seen.append(msg.event)
        assert seen[-1] == "end"
        failed = await beta.submit("fail", {"message": "boom"})
        done = await beta.wait(failed["id"], timeout_s=60)
        assert done["status"] == "failed"
        assert await _status(alpha.retry(failed["id"])) == 404
        assert (await beta.retry(failed["id"]))["status"] == "queued"
        assert (await alpha.cancel(a_id))["status"] in ("cancelled", "cancelling")
        assert (await alpha.wait(a_id, timeout_s=60))["status"] == "cancelled"
    finally:
        await asyncio.gather(alpha.close(), beta.close(), admin.close())


async def test_admin_routes_need_an_admin_token(make_mesh, tmp_path):
    mesh, setup = await _secure_mesh(make_mesh, tmp_path)
    url = mesh.peers[0].url
    context = ssl.create_default_context(cafile=str(setup.ca))
    tenant = {"Authorization": f"Bearer {setup.tenant_tokens['alpha']}"}
    admin = {"Authorization": f"Bearer {setup.admin_token}"}
    routes = [
        ("GET", "/v1/cluster", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/peers/peer-1", None),
        ("POST", "/v1/peers", {"id": "x", "http": "127.0.0.1:1", "raft": "127.0.0.1:2"}),
        ("POST", "/v1/peers/peer-3/drain", {"release": False}),
        ("POST", "/v1/peers/peer-3/undrain", None),
        ("POST", "/v1/peers/nobody/leave", {"release": False}),
    ]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        for method, path, body in routes:
            async with http.request(method, url + path, json=body, headers=tenant) as resp:
                assert resp.status == 403, (method, path, resp.status, await resp.text())
                assert (await resp.json())["error"]["code"] == "forbidden"
            async with http.request(method, url + path, json=body) as resp:
                assert resp.status == 401, (method, path)
        for path in ("/v1/cluster", "/metrics", "/v1/peers/peer-1"):
            async with http.get(url + path, headers=admin) as resp:
                assert resp.status == 200, (path, await resp.text())
        async with http.post(url + "/v1/peers/peer-3/undrain", headers=admin) as resp:
            assert resp.status == 200, await resp.text()
        # Plain http to an https peer gets nowhere; neither does a client without the CA.
        with pytest.raises(aiohttp.ClientError):
            async with aiohttp.ClientSession() as plain:
                async with plain.get(url + "/healthz") as resp:
                    await resp.read()
