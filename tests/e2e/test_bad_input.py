"""Bad input gets a clear error, the right status, and loses nothing."""

from __future__ import annotations

import aiohttp
import pytest
from support import eventually

pytestmark = pytest.mark.slow

TOKEN = "s3cret-api-token"


async def post(
    session: aiohttp.ClientSession, url: str, data: bytes, token: str | None = TOKEN
) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with session.post(url, data=data, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_each_bad_input_gets_its_status_and_a_valid_submission_still_works(make_mesh):
    mesh = await make_mesh("sqlite", env={"MESH_API_TOKEN": TOKEN, "MESH_COMMIT_TIMEOUT_S": "2"})
    url = mesh.peers[1].url
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as s:
        cases = [
            (b'{"agent": "echo", "input": ', 400, "malformed_json", "not valid JSON"),
            (b'{"input": 1}', 400, "bad_request", "missing field 'agent'"),
            (b'{"agent": "echo"}', 400, "bad_request", "missing field 'input'"),
            (b"[1, 2]", 400, "bad_request", "JSON object"),
            (b'{"agent": "nope", "input": 1}', 400, "unknown_agent", "unknown agent 'nope'"),
            (
                b'{"agent": "echo", "input": 1, "priority": "high"}',
                400,
                "bad_request",
                "'priority' must be",
            ),
            (
                b'{"agent": "echo", "input": 1, "max_attempts": 0}',
                400,
                "bad_request",
                "max_attempts",
            ),
            (
                b'{"agent": "echo", "input": "' + b"x" * (2 * 1024 * 1024) + b'"}',
                413,
                "payload_too_large",
                "exceeds the limit",
            ),
        ]
        for body, status, code, words in cases:
            got, _, payload = await post(s, f"{url}/v1/runs", body)
            assert got == status, (body[:60], payload)
            assert payload["error"]["code"] == code
            assert words in payload["error"]["message"], payload

        got, _, payload = await post(
            s, f"{url}/v1/runs", b'{"agent": "echo", "input": 1}', token="wrong"
        )
        assert got == 401 and "token" in payload["error"]["message"]
        got, _, payload = await post(
            s, f"{url}/v1/runs", b'{"agent": "echo", "input": 1}', token=None
        )
        assert got == 401

        async with s.post(
            f"{url}/internal/v1/heartbeat", json={"id": "peer-1", "incarnation": "forged"}
        ) as resp:
            assert resp.status == 401, "an unauthenticated peer cannot report liveness"

        async with s.get(f"{url}/v1/runs/does-not-exist", headers=auth) as resp:
            assert resp.status == 404
            assert "does-not-exist" in (await resp.json())["error"]["message"]
        async with s.get(f"{url}/v1/runs?status=weird", headers=auth) as resp:
            assert resp.status == 400

        got, _, payload = await post(
            s,
            f"{url}/v1/runs",
            b'{"agent": "echo", "input": {"ok": true}, "idempotency_key": "k1"}',
        )
        assert got == 202, payload
        run_id = payload["id"]
        got, _, again = await post(
            s,
            f"{url}/v1/runs",
            b'{"agent": "echo", "input": {"ok": true}, "idempotency_key": "k1"}',
        )
        assert got == 200 and again["id"] == run_id

        async def finished() -> dict | None:
            async with s.get(f"{url}/v1/runs/{run_id}", headers=auth) as resp:
                run = await resp.json()
                return run if run["status"] == "succeeded" else None

        run = await eventually(finished, 30, "the valid run")
        assert run["result"] == {"ok": True}

        async with s.get(f"{url}/v1/runs?limit=10", headers=auth) as resp:
            listed = (await resp.json())["runs"]
        assert [r["id"] for r in listed] == [run_id], "rejected submissions left nothing behind"

        # Quorum lost: two of three peers gone. The survivor answers 503 with Retry-After.
        for peer in (mesh.peers[0], mesh.peers[2]):
            mesh.kill(peer.id)
        got, headers, payload = await post(s, f"{url}/v1/runs", b'{"agent": "echo", "input": 2}')
        assert got == 503, payload
        assert payload["error"]["code"] == "no_quorum"
        assert int(headers["Retry-After"]) >= 1
        async with s.get(f"{url}/readyz") as resp:
            assert resp.status in (200, 503)
        async with s.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        async with s.get(f"{url}/metrics") as resp:
            text = await resp.text()
            assert "raftmesh_submissions_total" in text and "raftmesh_queue_depth" in text
