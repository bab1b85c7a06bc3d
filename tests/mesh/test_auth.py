"""Tokens, tenants and limits (issue 10, findings 5 and 9) at the edges that
need no mesh: the tokens file, the settings' refusal of an open API off
loopback, the routes' scoping (real HTTP, a stand-in peer), and the
replicated state's per-tenant idempotency keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_api_routes import StandIn

from raftmesh.chaos.secure import write_tokens_file
from raftmesh.consensus import commands
from raftmesh.consensus.results import Submitted
from raftmesh.consensus.state import MeshState
from raftmesh.mesh.api import build_app
from raftmesh.mesh.auth import Authenticator, TokensFileError, load_tokens
from raftmesh.mesh.events import Frame
from raftmesh.mesh.settings import Settings, SettingsError

ADMIN, ALPHA, BETA = "admin-token", "alpha-token", "beta-token"


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.toml"
    write_tokens_file(path, ADMIN, {"alpha": ALPHA, "beta": BETA})
    return path


def test_the_tokens_file_holds_digests_and_scopes(tokens_file: Path, tmp_path: Path) -> None:
    text = tokens_file.read_text()
    assert ALPHA not in text and ADMIN not in text
    auth = Authenticator.build("", str(tokens_file))
    alpha = auth.principal(ALPHA)
    admin = auth.principal(ADMIN)
    assert alpha is not None and (alpha.admin, alpha.tenant) == (False, "alpha")
    assert admin is not None and (admin.admin, admin.tenant) == (True, None)
    assert auth.principal("guess") is None and auth.principal(None) is None
    bad = tmp_path / "bad.toml"
    for content, fragment in [
        ('[[token]]\nsha256 = "abc"\ntenant = "t"\n', "64 hex digits"),
        ('[[token]]\nsha256 = "' + "a" * 64 + '"\nadmin = false\n', "needs tenant"),
        ('[[token]]\nsha256 = "' + "a" * 64 + '"\ntenant = "t"\nscope = "x"\n', "unknown keys"),
        ("token = 1\n", "[[token]] tables"),
    ]:
        bad.write_text(content)
        with pytest.raises(TokensFileError, match=fragment.replace("[", r"\[")):
            load_tokens(str(bad))


def test_an_open_api_off_loopback_is_refused(tokens_file: Path) -> None:
    exposed = {"http": "0.0.0.0:8001", "secret": "s"}
    with pytest.raises(SettingsError, match="--api-tokens-file"):
        Settings(**exposed).check_auth()
    Settings(**exposed, insecure_no_auth=True).check_auth()
    Settings(**exposed, api_token="t").check_auth()
    Settings(**exposed, api_tokens_file=str(tokens_file)).check_auth()
    Settings().check_auth()  # loopback: open is the peer's own user's business


def test_tenants_have_a_queued_maximum_by_default() -> None:
    settings = Settings()
    assert settings.default_tenant_max_queued == 10_000
    assert settings.replicated_policy()["default_tenant_max_queued"] == 10_000


def test_one_idempotency_key_two_tenants_two_runs() -> None:
    state = MeshState()

    def submit(n: int, tenant: str) -> tuple[str | None, bool]:
        spec = {"id": f"r{n}", "agent": "a", "input": 1, "tenant": tenant}
        run = {**spec, "idempotency_key": "order-42"}
        result = state.apply(commands.Submit(f"c{n}", 1000 + n, [run]))
        assert isinstance(result, Submitted)
        (outcome,) = result.runs
        assert outcome.rejection is None, outcome.message
        return outcome.id, outcome.created

    assert submit(1, "victim") == ("r1", True)
    assert submit(2, "attacker") == ("r2", True), "the key must not find another tenant's run"
    assert submit(3, "victim") == ("r1", False)
    restored = MeshState.from_dict(state.to_dict())
    assert restored.idempotency == state.idempotency


class Tenanted(StandIn):
    """Records the tenant each call was scoped to; streams wait until released."""

    def __init__(self, auth: Authenticator) -> None:
        super().__init__()
        self.auth = auth
        self.max_streams = 3
        self.max_streams_per_token = 2
        self.scopes: list[str | None] = []
        self.hold = asyncio.Event()

    async def get_run(self, run_id: str, tenant: str | None) -> dict[str, Any]:
        self.scopes.append(tenant)
        return {"id": run_id, "status": "running"}

    async def follow_events(self, run_id: str, after_seq: int) -> AsyncIterator[Frame]:
        yield Frame(event="progress", data={}, id=1)
        await self.hold.wait()


@pytest.fixture
async def tenanted(tokens_file: Path) -> AsyncIterator[tuple[TestClient, Tenanted]]:
    peer = Tenanted(Authenticator.build("", str(tokens_file)))
    client = TestClient(TestServer(build_app(peer)))
    await client.start_server()
    try:
        yield client, peer
    finally:
        peer.hold.set()
        await client.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_tenant_token_submits_as_its_tenant(tenanted) -> None:
    client, peer = tenanted
    body = {"agent": "echo", "input": 1}
    resp = await client.post("/v1/runs", json=body, headers=bearer(ALPHA))
    assert resp.status == 202 and peer.submitted[-1]["tenant"] == "alpha"
    resp = await client.post("/v1/runs", json={**body, "tenant": "alpha"}, headers=bearer(ALPHA))
    assert resp.status == 202
    resp = await client.post("/v1/runs", json={**body, "tenant": "beta"}, headers=bearer(ALPHA))
    assert resp.status == 403
    assert "'alpha'" in (await resp.json())["error"]["message"]
    resp = await client.post("/v1/runs", json={**body, "tenant": "beta"}, headers=bearer(ADMIN))
    assert resp.status == 202 and peer.submitted[-1]["tenant"] == "beta"
    assert len(peer.submitted) == 3
    await client.get("/v1/runs/r1", headers=bearer(BETA))
    await client.get("/v1/runs/r1", headers=bearer(ADMIN))
    assert peer.scopes == ["beta", None]


async def test_admin_routes_answer_tenants_403(tenanted) -> None:
    client, _ = tenanted
    for path in ("/v1/cluster", "/metrics"):
        assert (await client.get(path, headers=bearer(ALPHA))).status == 403, path
        assert (await client.get(path, headers=bearer(ADMIN))).status == 200, path
        assert (await client.get(path)).status == 401, path


async def test_event_streams_are_limited_per_token_and_per_peer(tenanted) -> None:
    client, peer = tenanted

    async def open_stream(token: str) -> Any:
        resp = await client.get("/v1/runs/r1/events", headers=bearer(token))
        if resp.status == 200:
            await resp.content.readline()  # the stream is being served
        return resp

    held = [await open_stream(ALPHA), await open_stream(ALPHA)]
    assert [r.status for r in held] == [200, 200]
    third = await open_stream(ALPHA)
    assert third.status == 429
    error = (await third.json())["error"]
    assert error["code"] == "too_many_streams" and "max_streams_per_token" in error["message"]
    held.append(await open_stream(BETA))
    assert held[-1].status == 200
    peer_wide = await open_stream(ADMIN)
    assert peer_wide.status == 429 and "max_streams" in (await peer_wide.json())["error"]["message"]
    held[0].close()
    await asyncio.sleep(0.2)  # the server notices the closed stream on its next write
    peer.hold.set()
