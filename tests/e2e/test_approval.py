"""Approvals end to end (issue 11, point 3): the ``approval`` agent, and chat
tools that require approval, on real peers over real HTTP.

The chat runs talk to the stub model server (chat_stub.py), which, offered
``send_email`` (approval_tools.py), asks for two mails in one turn and records
what it is then told of each; ``send_email`` writes a line per call that really
ran to a mail log outside the mesh, so a call that ran twice or without
approval shows there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from approval_tools import MAIL_LOG_ENV, read_mail_log
from chat_stub import MODEL, ChatStub
from support import eventually, wait_all_terminal

from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.mesh.devmesh import DevMesh
from raftmesh.runner.payload import event_data
from raftmesh.storage import Store

pytestmark = pytest.mark.slow

E2E_DIR = Path(__file__).resolve().parent
TOOLS_ENV = {"PYTHONPATH": str(E2E_DIR), "MESH_AGENT_MODULES": "approval_tools"}


def chat_env(stub: ChatStub, mail_log: Path) -> dict[str, str]:
    return {
        **TOOLS_ENV,
        "MESH_CHAT_BASE_URL": stub.url,
        "MESH_CHAT_MODEL": MODEL,
        "MESH_CHAT_API_KEY": "stub-key",
        MAIL_LOG_ENV: str(mail_log),
    }


@pytest.fixture
async def stub() -> Any:
    s = ChatStub(fail_first=0)
    await s.start()
    yield s
    await s.stop()


async def requested(store: Store, run_id: str) -> list[Any]:
    """The data of every ``approval.requested`` event the run stored, in order."""
    return [
        event_data(e.data)
        for e in await store.read_events(run_id)
        if e.kind == "approval.requested"
    ]


async def waiting_after(
    client: MeshClient, store: Store, run_id: str, asked: int
) -> dict[str, Any]:
    """The run once it waits without an owner, having asked ``asked`` times."""

    async def check() -> dict[str, Any] | None:
        run = await client.get_run(run_id)
        assert run["status"] not in ("succeeded", "failed", "cancelled", "timed_out"), run
        if run["status"] != "waiting" or len(await requested(store, run_id)) != asked:
            return None
        return run

    return await eventually(check, 60, f"run {run_id} to wait after {asked} requests")


async def slots_used(client: MeshClient) -> int:
    return sum(p["running"] for p in (await client.cluster())["peers"])


async def test_an_approval_run_waits_without_a_slot_and_returns_the_decision(
    make_mesh, open_mesh_store
) -> None:
    mesh: DevMesh = await make_mesh("postgres")
    store = await open_mesh_store(mesh)
    client = MeshClient(mesh.peers[0].url, timeout_s=10)
    other = MeshClient(mesh.peers[2].url, timeout_s=10)
    try:
        prompt = {"question": "deploy v7 to production?", "diff": ["+a", "-b"]}
        run_id = (await client.submit("approval", {"prompt": prompt}))["id"]
        run = await waiting_after(client, store, run_id, 1)
        assert run["owner"] is None
        cluster = await client.cluster()
        assert cluster["runs"]["waiting"] == 1 and cluster["runs"]["running"] == 0
        assert await slots_used(client) == 0, "a waiting run holds no slot"

        async for message in other.events(run_id):  # from a peer that never ran it
            assert message.data["kind"] == "approval.requested"
            assert message.data["data"] == {"prompt": prompt}
            break

        decision = {"approve": True, "by": "alice", "note": "ship it"}
        assert (await other.signal(run_id, "decision", decision))["seq"] == 0
        done = await wait_all_terminal(client, [run_id], timeout_s=60)
        assert done[run_id]["status"] == "succeeded", done
        assert done[run_id]["result"] == decision
        assert await requested(store, run_id) == [{"prompt": prompt}], "asked once, not again"

        for bad, why in [
            ("deploy?", "an object"),
            ({"question": "deploy?"}, '"prompt"'),
            ({"prompt": "deploy?", "timeout": 5}, "unknown fields ['timeout']"),
            ({"prompt": "deploy?", "timeout_s": "soon"}, "timeout_s"),
            ({"prompt": "deploy?", "timeout_s": -1}, "timeout_s"),
        ]:
            with pytest.raises(MeshHTTPError) as refused:
                await client.submit("approval", bad)
            assert refused.value.status == 400 and why in refused.value.message, (bad, refused)

        late = (await client.submit("approval", {"prompt": "p", "timeout_s": 0.5}))["id"]
        done = await wait_all_terminal(client, [late], timeout_s=60)
        assert done[late]["status"] == "failed" and done[late]["attempts"] == 1, done
        assert "no 'decision' signal within 0.5s" in done[late]["error"], done
    finally:
        await client.close()
        await other.close()


async def test_chat_tools_requiring_approval_run_only_when_approved_and_a_kill_changes_nothing(
    make_mesh, open_mesh_store, stub: ChatStub, tmp_path: Path
) -> None:
    """Two send_email calls in one turn, each waiting for its own decision:
    the first approved (it runs, once), the second denied (it does not run,
    and the model is told the note). While the run waits, the peer that ran
    it until then is killed with SIGKILL: nothing changes, and the run goes
    on elsewhere without calling the model or asking again."""
    mail_log = tmp_path / "mail.log"
    mesh: DevMesh = await make_mesh("postgres", env=chat_env(stub, mail_log))
    store = await open_mesh_store(mesh)
    prompt = "approve one mail, deny the other"
    first = MeshClient(mesh.peers[0].url, timeout_s=10)
    clients = [first]
    try:
        run_id = (await first.submit("chat", {"prompt": prompt, "tools": ["send_email"]}))["id"]
        run = await waiting_after(first, store, run_id, 1)
        assert run["owner"] is None and await slots_used(first) == 0
        assert await requested(store, run_id) == [
            {
                "tool": "send_email",
                "arguments": {"to": "ops0@example.com", "subject": "deploy v0"},
                "call_id": "call_mail_0",
            }
        ]
        assert read_mail_log(str(mail_log)) == [], "nothing ran before a decision"

        owner = (await first.steps(run_id))["owners"][-1]["peer"]
        mesh.kill(owner)
        alive = next(p for p in mesh.peers if p.id != owner)
        client = MeshClient(alive.url, timeout_s=10)
        clients.append(client)

        async def owner_down() -> bool:
            peers = (await client.cluster())["peers"]
            return any(p["id"] == owner and p["status"] == "down" for p in peers)

        await eventually(owner_down, 30, f"{owner} to be declared down")
        still = await client.get_run(run_id)
        assert still["status"] == "waiting" and still["owner"] is None, still
        assert (still["epoch"], still["attempts"]) == (run["epoch"], run["attempts"])

        await client.signal(run_id, "decision", {"approve": True})
        await waiting_after(client, store, run_id, 2)
        assert read_mail_log(str(mail_log)) == ["ops0@example.com deploy v0"]
        await client.signal(run_id, "decision", {"approve": False, "note": "not on a Friday"})
        done = await wait_all_terminal(client, [run_id], timeout_s=60)
        assert done[run_id]["status"] == "succeeded", done

        told = stub.tool_results[prompt]
        assert told["call_mail_0"] == "sent 'deploy v0' to ops0@example.com"
        assert "denied" in told["call_mail_1"] and "not on a Friday" in told["call_mail_1"]
        assert done[run_id]["result"]["answer"] == f"{told['call_mail_0']} | {told['call_mail_1']}"
        assert read_mail_log(str(mail_log)) == ["ops0@example.com deploy v0"], "ran once"
        assert [r["call_id"] for r in await requested(store, run_id)] == [
            "call_mail_0",
            "call_mail_1",
        ], "each call asked once"
        assert stub.calls(prompt, 0) == 1, "the journaled model call was not made again"
    finally:
        for c in clients:
            await c.close()


async def test_a_malformed_decision_is_a_denial_saying_why(
    make_mesh, open_mesh_store, stub: ChatStub, tmp_path: Path
) -> None:
    mail_log = tmp_path / "mail.log"
    mesh: DevMesh = await make_mesh("sqlite", nodes=1, env=chat_env(stub, mail_log))
    store = await open_mesh_store(mesh)
    prompt = "decide badly"
    async with MeshClient(mesh.peers[0].url, timeout_s=10) as client:
        run_id = (await client.submit("chat", {"prompt": prompt, "tools": ["send_email"]}))["id"]
        await waiting_after(client, store, run_id, 1)
        await client.signal(run_id, "decision", "yes")
        await waiting_after(client, store, run_id, 2)
        await client.signal(run_id, "decision", {"approve": True, "note": ["a", "list"]})
        done = await wait_all_terminal(client, [run_id], timeout_s=60)
    assert done[run_id]["status"] == "succeeded", done
    told = stub.tool_results[prompt]
    assert 'the decision was not {"approve": true|false' in told["call_mail_0"], told
    assert '"yes"' in told["call_mail_0"], told
    assert "note must be text" in told["call_mail_1"], told
    assert all(t.startswith("denied:") for t in told.values()), told
    assert read_mail_log(str(mail_log)) == [], "no call ran"
