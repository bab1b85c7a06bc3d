"""A LangGraph graph that calls ``interrupt()`` on real peers over PostgreSQL:
the run waits without a slot, a ``resume`` signal continues it, and the wait
survives kill -9 of every peer and a restart of the whole mesh (issue 14).

The graph (framework_agents.needs_approval) drafts, asks for an approval,
asks for a note, then publishes; the draft, the approved node and the publish
are written to a ledger outside the mesh, so a node that ran twice shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from framework_agents import read_ledger
from support import TERMINAL, eventually

from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh
from raftmesh.runner.payload import event_data
from raftmesh.storage import Store

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": str(HERE)}
GRAPH = "framework_agents:needs_approval"
DRAFT = "release notes v7"


async def resume(mesh: DevMesh, run_id: str, data: Any) -> dict[str, Any]:
    """POST the ``resume`` signal to whichever peer answers (503 while the
    mesh elects a leader after a restart)."""

    async def send() -> dict[str, Any] | None:
        for peer in mesh.peers:
            url = f"{mesh.url(peer.id)}/v1/runs/{run_id}/signals/resume"
            try:
                async with aiohttp.ClientSession() as http:
                    async with http.post(url, json={"data": data}) as resp:
                        if resp.status == 202:
                            answer: dict[str, Any] = await resp.json()
                            return answer
                        assert resp.status == 503, (resp.status, await resp.text())
            except aiohttp.ClientError:
                continue
        return None

    return await eventually(send, 60, f"the resume signal {data!r} to be taken")


async def asked(store: Store, run_id: str) -> list[Any]:
    """The values of every interrupt event the run stored, in order."""
    return [
        [i["value"] for i in event_data(e.data)["interrupts"]]
        for e in await store.read_events(run_id)
        if e.kind == "interrupt"
    ]


async def waiting_at(
    client: MeshClient, store: Store, run_id: str, interrupts: int
) -> dict[str, Any]:
    """The run once it waits, having asked ``interrupts`` questions."""

    async def check() -> dict[str, Any] | None:
        run = await client.get_run(run_id)
        assert run["status"] not in TERMINAL, run
        if run["status"] != "waiting" or len(await asked(store, run_id)) != interrupts:
            return None
        return run

    return await eventually(check, 90, f"run {run_id} to wait at interrupt {interrupts}")


async def slots_used(client: MeshClient) -> int:
    return sum(p["running"] for p in (await client.cluster())["peers"])


def check_ledger(ledger: str) -> list[tuple[str, int, str]]:
    entries = read_ledger(ledger)
    print("\nledger:", entries)
    assert [(n, what) for n, _, what in entries] == [
        ("draft", "start"),
        ("draft", "end"),
        ("approve", "end"),
        ("publish", "start"),
        ("publish", "end"),
    ], "each node ran once: none before an interrupt ran again"
    return entries


async def test_an_interrupted_graph_waits_without_a_slot_until_resume_signals_answer_it(
    make_mesh, open_mesh_store, tmp_path: Path
):
    mesh = await make_mesh("postgres", env=ENV)
    store = await open_mesh_store(mesh)
    ledger = str(tmp_path / "ledger")
    async with MeshClient(mesh.url("peer-1"), timeout_s=20) as client:
        spec = {"graph": GRAPH, "input": {"ledger": ledger}}
        run_id = (await client.submit("langgraph", spec))["id"]

        run = await waiting_at(client, store, run_id, 1)
        assert run["owner"] is None
        assert await slots_used(client) == 0, "a waiting run holds no slot"
        assert await asked(store, run_id) == [[{"approve": DRAFT}]]
        assert [n for n, _, _ in read_ledger(ledger)] == ["draft", "draft"]

        sent = await resume(mesh, run_id, {"ok": True, "by": "ana"})
        assert (sent["name"], sent["seq"], sent["duplicate"]) == ("resume", 0, False)
        run = await waiting_at(client, store, run_id, 2)
        assert run["owner"] is None and await slots_used(client) == 0
        assert (await asked(store, run_id))[1] == [{"note_for": DRAFT}], "its own question"

        await resume(mesh, run_id, "ship it")
        done = await client.wait(run_id, 90)

    assert done["status"] == "succeeded", done
    assert done["result"] == {
        "ledger": ledger,
        "draft": DRAFT,
        "approved": {"ok": True, "by": "ana"},
        "note": "ship it",
        "published": True,
    }, "each interrupt got its own signal, in order"
    check_ledger(ledger)


async def test_an_interrupted_graph_is_resumed_after_every_peer_was_killed_and_restarted(
    make_mesh, open_mesh_store, tmp_path: Path
):
    mesh = await make_mesh("postgres", env=ENV)
    store = await open_mesh_store(mesh)
    ledger = str(tmp_path / "ledger")
    client = MeshClient(mesh.url("peer-2"), timeout_s=20)
    try:
        spec = {"graph": GRAPH, "input": {"ledger": ledger}}
        run_id = (await client.submit("langgraph", spec))["id"]
        await waiting_at(client, store, run_id, 1)

        for peer in mesh.peers:
            mesh.kill(peer.id)
        for peer in mesh.peers:
            mesh.restart(peer.id)
        await mesh.wait_ready(timeout_s=90)
        run = await waiting_at(client, store, run_id, 1)
        assert run["owner"] is None, "still waiting after the restart, on no peer"

        await resume(mesh, run_id, {"ok": True, "by": "li"})
        await waiting_at(client, store, run_id, 2)
        await resume(mesh, run_id, "after the restart")
        done = await client.wait(run_id, 90)
    finally:
        await client.close()

    assert done["status"] == "succeeded", done
    assert done["result"]["approved"] == {"ok": True, "by": "li"}
    assert done["result"]["note"] == "after the restart"
    entries = check_ledger(ledger)
    first_pid = entries[0][1]
    assert all(pid != first_pid for _, pid, _ in entries[2:]), (
        "the draft ran before the restart, the rest after it, on a new process"
    )
    assert await asked(store, run_id) == [[{"approve": DRAFT}], [{"note_for": DRAFT}]], (
        "each interrupt said once, though the first was replayed after the restart"
    )
