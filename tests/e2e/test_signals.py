"""Signals end to end (issue 11): real peers, real PostgreSQL, real HTTP.

Runs use ``probe_wait`` (tests/e2e/probe_agents.py), which writes a line to a
witness file whenever one of its steps runs, so a checkpointed step that ran
again after a suspension or a full restart shows there.
"""

from __future__ import annotations

import ssl
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from probe_agents import read_witness
from support import eventually, wait_all_terminal

from raftmesh.chaos.secure import make_secure_setup
from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh

pytestmark = pytest.mark.slow

E2E_DIR = Path(__file__).resolve().parent
PROBES = {"PYTHONPATH": str(E2E_DIR), "MESH_AGENT_MODULES": "probe_agents"}


class Signaller:
    """POST /v1/runs/{id}/signals/{name} as any HTTP client would, answering
    (status, body) so the error statuses can be checked as they are."""

    def __init__(self, url: str, token: str | None = None, ca: Path | None = None) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        ssl_ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
        connector = aiohttp.TCPConnector(ssl=ssl_ctx) if ssl_ctx else None
        self.http = aiohttp.ClientSession(headers=headers, connector=connector)

    async def send(
        self, run_id: str, name: str, data: Any = None, key: str | None = None, **body: Any
    ) -> tuple[int, dict[str, Any]]:
        payload = {"data": data, **body}
        if key is not None:
            payload["idempotency_key"] = key
        path = f"/v1/runs/{quote(run_id, safe='')}/signals/{quote(name, safe='')}"
        async with self.http.post(self.url + path, json=payload) as resp:
            return resp.status, await resp.json()

    async def close(self) -> None:
        await self.http.close()


async def waiting(client: MeshClient, run_id: str) -> dict[str, Any] | None:
    run = await client.get_run(run_id)
    return run if run["status"] == "waiting" else None


def assert_each_step_ran_once(witness: Path, run_id: str, steps: int) -> None:
    ran = Counter(
        i for r, i, _, _, what in read_witness(str(witness)) if r == run_id and what == "start"
    )
    assert ran == Counter(range(steps)), f"a checkpointed step ran again: {sorted(ran.items())}"


async def test_signal_semantics_and_errors(make_mesh, tmp_path: Path) -> None:
    """On a mesh with tenants: a signal sent before the run waits for it is
    delivered; two to one name arrive in order; a repeated idempotency key is
    delivered once; a run waiting for a signal holds no slot; 400, 404 and 409
    answer as specified, and another tenant's run is not found."""
    setup = make_secure_setup(tmp_path / "secure")
    mesh = await make_mesh("postgres", env={**setup.peer_env(), **PROBES})
    urls = [p.url for p in mesh.peers]
    alpha = MeshClient(urls[0], setup.tenant_tokens["alpha"], ca=str(setup.ca))
    admin = MeshClient(urls[1], setup.admin_token, ca=str(setup.ca))
    send = Signaller(urls[2], setup.tenant_tokens["alpha"], setup.ca)
    other = Signaller(urls[0], setup.tenant_tokens["beta"], setup.ca)
    witness = tmp_path / "witness.log"
    try:
        waits = [
            {"signal": "start"},
            {"signal": "go"},
            {"signal": "go"},
            {"signal": "once"},
            {"signal": "once", "timeout_s": 1.0},
        ]
        run_id = (await alpha.submit("probe_wait", {"log": str(witness), "waits": waits}))["id"]
        run = await eventually(lambda: waiting(alpha, run_id), 60, "the run to wait for start")
        assert run["owner"] is None
        cluster = await admin.cluster()
        assert cluster["runs"]["waiting"] == 1
        assert sum(p["running"] for p in cluster["peers"]) == 0, "a waiting run holds no slot"

        # sent while the run waits for another name: kept for later
        assert await send.send(run_id, "go", "a") == (
            202,
            {"run_id": run_id, "name": "go", "seq": 0, "duplicate": False},
        )
        assert (await send.send(run_id, "go", "b"))[1]["seq"] == 1
        first = await send.send(run_id, "once", {"n": 1}, key="k1")
        again = await send.send(run_id, "once", {"n": 2}, key="k1")
        assert first[1] | {"duplicate": True} == again[1] and again[0] == 202
        assert (first[1]["seq"], first[1]["duplicate"]) == (0, False)

        # errors, before the run ends
        for bad in ("bad name", "x" * 129, "é"):
            status, body = await send.send(run_id, bad, 1)
            assert status == 400 and "signal name" in body["error"]["message"], (bad, body)
        status, body = await send.send(run_id, "go", 1, color="blue")
        assert status == 400 and "unknown fields" in body["error"]["message"], body
        status, body = await send.send(run_id, "go", {"n": -(2**90)})
        assert status == 400 and "64 bits" in body["error"]["message"], body
        assert (await send.send("no-such-run", "go", 1))[0] == 404
        assert (await other.send(run_id, "go", 1))[0] == 404, "another tenant's run"

        assert (await send.send(run_id, "start", "s"))[0] == 202
        done = await wait_all_terminal(alpha, [run_id], timeout_s=90)
        assert done[run_id]["status"] == "succeeded", done
        assert done[run_id]["result"] == {"got": ["s", "a", "b", {"n": 1}, "SignalTimeout"]}
        assert_each_step_ran_once(witness, run_id, len(waits) + 1)

        status, body = await send.send(run_id, "go", 1)
        assert status == 409 and "succeeded" in body["error"]["message"], body
        # A retry of a signal it was sent, after the run ended, is the duplicate
        # it is (the client may have lost the first 202); a new key is refused.
        assert await send.send(run_id, "once", {"n": 3}, key="k1") == (
            202,
            first[1] | {"duplicate": True},
        )
        assert (await send.send(run_id, "once", {"n": 3}, key="k2"))[0] == 409
        assert (await send.send(run_id, "go", {"n": 3}, key="k1"))[0] == 409, (
            "k1 was sent as 'once'"
        )
        assert (await other.send(run_id, "go", 1))[0] == 404, "ended, and still not beta's"
    finally:
        for c in (alpha, admin):
            await c.close()
        for s in (send, other):
            await s.close()


async def test_a_waiting_run_survives_kill_9_of_every_peer(
    make_mesh, tmp_path: Path, open_mesh_store
) -> None:
    """A run waiting for a signal, then kill -9 of every peer and a full
    restart: it is still waiting, with no owner; the signal sent afterwards
    resumes it, and no checkpointed step runs again."""
    mesh: DevMesh = await make_mesh("postgres", env=PROBES)
    client = MeshClient(mesh.peers[0].url, timeout_s=10)
    send = Signaller(mesh.peers[1].url)
    witness = tmp_path / "witness.log"
    try:
        spec = {"log": str(witness), "waits": [{"signal": "decision"}]}
        run_id = (await client.submit("probe_wait", spec))["id"]
        await eventually(lambda: waiting(client, run_id), 60, "the run to wait")
        for peer in mesh.peers:
            mesh.kill(peer.id)
        for peer in mesh.peers:
            mesh.restart(peer.id)
        await mesh.wait_ready(timeout_s=60)
        run = await eventually(lambda: waiting(client, run_id), 60, "the run waiting again")
        assert run["owner"] is None
        store = await open_mesh_store(mesh)
        assert [s.name for s in await store.load_steps(run_id)] == ["step-0"]

        async def sent() -> tuple[int, dict[str, Any]] | None:
            answer = await send.send(run_id, "decision", {"approve": True})
            return answer if answer[0] == 202 else None

        await eventually(sent, 30, "the signal to be taken")
        done = await wait_all_terminal(client, [run_id], timeout_s=60)
        assert done[run_id]["status"] == "succeeded", done
        assert done[run_id]["result"] == {"got": [{"approve": True}]}
        assert_each_step_ran_once(witness, run_id, 2)
        assert (await store.list_signals(run_id))[0].seq == 0
    finally:
        await client.close()
        await send.close()
