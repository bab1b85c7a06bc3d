"""Bad input gets a clear error, the right status, and loses nothing."""

from __future__ import annotations

import json
import re

import aiohttp
import msgspec
import pytest
from support import eventually

from raftmesh.mesh.schemas import ErrorResponse, RunView

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
        async with s.get(f"{url}/metrics", headers=auth) as resp:  # the admin token
            text = await resp.text()
            assert "raftmesh_submissions_total" in text and "raftmesh_queue_depth" in text


def nested(depth: int) -> bytes:
    return b'{"agent": "echo", "input": ' + b"[" * depth + b"]" * depth + b"}"


def submission(**fields: object) -> bytes:
    return json.dumps({"agent": "echo", "input": 1, **fields}).encode()


async def call(
    s: aiohttp.ClientSession,
    method: str,
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Status and body of one request, or (0, why) if no answer came in time."""
    all_headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        async with s.request(
            method, url, data=data, headers={**all_headers, **(headers or {})}
        ) as resp:
            return resp.status, await resp.text()
    except TimeoutError:
        return 0, "no answer within the client timeout"


async def echo_succeeds(s: aiohttp.ClientSession, url: str, value: object) -> dict:
    status, body = await call(s, "POST", f"{url}/v1/runs", submission(input=value))
    assert status == 202, (url, status, body)
    run_id = json.loads(body)["id"]

    async def finished() -> dict | None:
        _, text = await call(s, "GET", f"{url}/v1/runs/{run_id}")
        run = json.loads(text)
        return run if run.get("status") == "succeeded" else None

    run = await eventually(finished, 30, f"a normal echo run on {url}")
    assert run["result"] == value
    return run


async def test_hostile_values_get_400_reserve_nothing_and_leave_the_mesh_serving(make_mesh):
    """Issue 10, finding 8 (and 7's bounds): each of these used to give a 500,
    a 200 with an empty stream, a stuck reservation or a run that fails (or
    never ends) later. Every one must be a 400 naming what is wrong."""
    mesh = await make_mesh("postgres", env={"MESH_API_TOKEN": TOKEN})
    url = mesh.peers[1].url
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        run = await echo_succeeds(s, url, "first")
        events = f"{url}/v1/runs/{run['id']}/events"
        join_bad_raft = json.dumps({"id": "peer-9", "http": "127.0.0.1:1", "raft": "zz:yy"})
        join_bad_http = json.dumps({"id": "peer-9", "http": "nohost", "role": "executor"})
        cases = [
            ("input nested 1000 deep", "POST", "/v1/runs", nested(1000), None, "64 levels"),
            ("input nested 100000 deep", "POST", "/v1/runs", nested(100_000), None, "64 levels"),
            ("body nested 65 deep", "POST", "/v1/runs", nested(64), None, "64 levels"),
            (
                "timeout_s NaN",
                "POST",
                "/v1/runs",
                submission()[:-1] + b', "timeout_s": NaN}',
                None,
                "JSON",
            ),
            (
                "timeout_s Infinity",
                "POST",
                "/v1/runs",
                submission()[:-1] + b', "timeout_s": Infinity}',
                None,
                "JSON",
            ),
            (
                "timeout_s 1e999",
                "POST",
                "/v1/runs",
                submission()[:-1] + b', "timeout_s": 1e999}',
                None,
                "out of range",
            ),
            (
                "timeout_s 1e300",
                "POST",
                "/v1/runs",
                submission(timeout_s=1e300),
                None,
                "'timeout_s'",
            ),
            ("timeout_s 0", "POST", "/v1/runs", submission(timeout_s=0), None, "'timeout_s'"),
            (
                "priority 2**40 (over INTEGER)",
                "POST",
                "/v1/runs",
                submission(priority=2**40),
                None,
                "'priority' must be an integer from -2147483648 to 2147483647",
            ),
            (
                "priority -2**31 - 1",
                "POST",
                "/v1/runs",
                submission(priority=-(2**31) - 1),
                None,
                "'priority'",
            ),
            (
                "max_attempts 2**31",
                "POST",
                "/v1/runs",
                submission(max_attempts=2**31),
                None,
                "'max_attempts'",
            ),
            (
                "budget over int64",
                "POST",
                "/v1/runs",
                submission(budget={"tokens": 2**63}),
                None,
                "'budget'",
            ),
            (
                "memory_limit_mb 2**60",
                "POST",
                "/v1/runs",
                submission(memory_limit_mb=2**60),
                None,
                "'memory_limit_mb'",
            ),
            (
                "idempotency_key of 300 bytes",
                "POST",
                "/v1/runs",
                submission(idempotency_key="é" * 150),
                None,
                "256 bytes",
            ),
            (
                "100 labels",
                "POST",
                "/v1/runs",
                submission(labels={f"k{i}": "v" for i in range(100)}),
                None,
                "'labels'",
            ),
            (
                "label value not a string",
                "POST",
                "/v1/runs",
                submission(labels={"gpu": 1}),
                None,
                "'labels'",
            ),
            (
                "Last-Event-ID 10**20",
                "GET",
                events,
                None,
                {"Last-Event-ID": "99999999999999999999"},
                "Last-Event-ID",
            ),
            (
                "Last-Event-ID of 5000 digits",
                "GET",
                events,
                None,
                {"Last-Event-ID": "9" * 5000},
                "Last-Event-ID",
            ),
            (
                "Last-Event-ID 2**31",
                "GET",
                events,
                None,
                {"Last-Event-ID": str(2**31)},
                "2147483647",
            ),
            ("after=-1", "GET", events + "?after=-1", None, None, "Last-Event-ID"),
            (
                "join with raft zz:yy",
                "POST",
                "/v1/peers",
                join_bad_raft.encode(),
                None,
                "field 'raft' must be HOST:PORT",
            ),
            (
                "join with http nohost",
                "POST",
                "/v1/peers",
                join_bad_http.encode(),
                None,
                "field 'http' must be HOST:PORT",
            ),
            (
                "join nested 1000 deep",
                "POST",
                "/v1/peers",
                b"[" * 1000 + b"]" * 1000,
                None,
                "64 levels",
            ),
        ]
        wrong = []
        for what, method, path, data, headers, words in cases:
            target = path if path.startswith("http") else f"{url}{path}"
            status, text = await call(s, method, target, data, headers)
            if status != 400 or words not in text:
                wrong.append(f"{what}: {status} {text[:200]!r}")
        assert not wrong, "\n".join(wrong)

        status, text = await call(s, "GET", f"{url}/v1/peers/peer-9")
        assert status == 404, ("a refused join reserved nothing", text)
        status, text = await call(s, "GET", f"{url}/v1/cluster")
        assert "peer-9" not in text
        deepest: list = []  # with the body around it, exactly the limit: 64 levels
        for _ in range(62):
            deepest = [deepest]
        await echo_succeeds(s, url, deepest)
        status, text = await call(s, "GET", f"{url}/v1/runs?limit=100")
        assert len(json.loads(text)["runs"]) == 2, "rejected submissions left nothing behind"
        for peer in mesh.peers:
            assert (await call(s, "GET", f"{peer.url}/healthz"))[0] == 200
            assert "internal error" not in peer.log_tail(400)
            assert "Traceback" not in peer.log_tail(400), peer.log_tail(60)


async def test_an_unencodable_priority_neither_wedges_a_peer_nor_the_leader(make_mesh):
    """Issue 10, finding 2: priority 2**64 passed validation, could not be
    msgpack-encoded and took every later proposal of that peer down with it;
    sent to the leader it stopped all scheduling."""
    mesh = await make_mesh("sqlite", env={"MESH_API_TOKEN": TOKEN, "MESH_COMMIT_TIMEOUT_S": "2"})
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        _, text = await call(s, "GET", f"{mesh.peers[0].url}/v1/cluster")
        leader_id = json.loads(text)["leader"]
        leader = mesh.peer(leader_id)
        follower = next(p for p in mesh.peers if p.id != leader_id)
        for peer in (follower, leader):
            for priority in (2**64, 2**63, 2**63 - 1):
                status, text = await call(
                    s, "POST", f"{peer.url}/v1/runs", submission(priority=priority)
                )
                assert status == 400 and "'priority'" in text, (peer.id, priority, status, text)
            # The input may be any JSON, but Raft carries it as msgpack: the
            # proposal itself fails, as a 400, and only for this caller.
            status, text = await call(s, "POST", f"{peer.url}/v1/runs", submission(input=2**64))
            assert status == 400 and "cannot be replicated" in text, (peer.id, status, text)
            await echo_succeeds(s, peer.url, f"after the bad priority on {peer.id}")


async def test_openapi_document_lists_the_routes_and_the_types_it_validates_with(make_mesh):
    mesh = await make_mesh("sqlite", nodes=1, env={"MESH_API_TOKEN": TOKEN})
    url = mesh.peers[0].url
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        status, text = await call(s, "GET", f"{url}/v1/openapi.json")
        assert status == 200, text
        doc = json.loads(text)
        assert doc["openapi"].startswith("3.1")
        for method, path in [
            ("post", "/v1/runs"),
            ("get", "/v1/runs"),
            ("get", "/v1/runs/{id}"),
            ("get", "/v1/runs/{id}/events"),
            ("post", "/v1/runs/{id}/cancel"),
            ("post", "/v1/runs/{id}/retry"),
            ("get", "/v1/agents"),
            ("get", "/v1/cluster"),
            ("get", "/healthz"),
            ("get", "/readyz"),
            ("get", "/metrics"),
            ("post", "/v1/peers"),
        ]:
            assert method in doc["paths"].get(path, {}), (method, path)
        schemas = doc["components"]["schemas"]
        priority = schemas["SubmitRequest"]["properties"]["priority"]["anyOf"][0]
        assert (priority["minimum"], priority["maximum"]) == (-(2**31), 2**31 - 1)
        assert set(schemas["SubmitRequest"]["required"]) == {"agent", "input"}
        ref = doc["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]
        assert ref["schema"]["$ref"] == "#/components/schemas/SubmitRequest"
        error = doc["paths"]["/v1/runs/{id}"]["get"]["responses"]["default"]
        assert error["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")

        # The documented run view is the one served: live and finished alike.
        status, text = await call(s, "POST", f"{url}/v1/runs", submission(input={"x": 1}))
        run_id = json.loads(text)["id"]
        _, live = await call(s, "GET", f"{url}/v1/runs/{run_id}")
        msgspec.json.decode(live, type=RunView)
        run = await echo_succeeds(s, url, "done")
        msgspec.convert(run, RunView)
        _, bad = await call(s, "POST", f"{url}/v1/runs", b"[1]")
        msgspec.json.decode(bad, type=ErrorResponse)

        # The security the document declares is the one enforced: without a
        # token every operation answers 401 but those it marks open.
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert doc["security"] == [{"bearer": []}]
        for path, operations in doc["paths"].items():
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            for method, op in operations.items():
                async with s.request(method.upper(), url + concrete) as resp:
                    if op.get("security") == []:
                        assert resp.status != 401, (method, path, resp.status)
                    else:
                        assert resp.status == 401, (method, path, resp.status)
