"""Agents written with LangGraph and the OpenAI Agents SDK, on real peers over
PostgreSQL, surviving a kill -9 of their owner mid-run."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from chat_stub import MODEL, ChatStub
from framework_agents import NODES, read_ledger
from support import eventually

from raftmesh.mesh.client import MeshClient
from raftmesh.runner.integrations.langgraph import MeshCheckpointSaver
from raftmesh.runner.payload import event_data

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": str(HERE)}


async def test_langgraph_graph_resumes_from_its_last_checkpoint_after_kill(
    make_mesh, open_mesh_store, tmp_path: Path
):
    mesh = await make_mesh("postgres", env=ENV)
    store = await open_mesh_store(mesh)
    cs = {p.id: MeshClient(p.url, timeout_s=10) for p in mesh.peers}
    ledger = str(tmp_path / "ledger")
    try:
        graph_input = {"ledger": ledger, "node_seconds": 1.0, "done": []}
        run_id = (
            await cs["peer-1"].submit(
                "langgraph", {"graph": "framework_agents:six_nodes", "input": graph_input}
            )
        )["id"]

        async def third_node_started() -> bool:
            return any(n == "n2" and what == "start" for n, _, what in read_ledger(ledger))

        await eventually(third_node_started, 30, "the graph to reach its third node")
        victim = (await cs["peer-1"].get_run(run_id))["owner"]
        mesh.kill(victim)
        survivor = next(c for p, c in cs.items() if p != victim)
        run = await survivor.wait(run_id, 60)

        assert run["status"] == "succeeded", run
        assert run["owner"] != victim
        assert run["result"]["done"] == NODES, "every node's update, once, in order"
        entries = read_ledger(ledger)
        print("\nledger:", entries)
        ends = [n for n, _, what in entries if what == "end"]
        starts = [n for n, _, what in entries if what == "start"]
        assert ends == NODES, "each node finished exactly once"
        assert starts == ["n0", "n1", "n2", "n2", "n3", "n4", "n5"], (
            "only the node the kill cut short ran again; the checkpointed ones did not"
        )
        first_pid = entries[0][1]
        assert all(pid == first_pid for n, pid, _ in entries[:4]), "n0, n1 ran on the victim"
        assert all(pid != first_pid for n, pid, _ in entries[5:]), "n2 again, n3-n5 on the heir"

        updates = [
            event_data(e.data) for e in await store.read_events(run_id) if e.kind == "updates"
        ]
        assert [next(iter(u)) for u in updates] == NODES, "one updates event per node"
        async with MeshCheckpointSaver.open(mesh.storage) as saver:
            latest = await saver.aget_tuple({"configurable": {"thread_id": run_id}})
            assert latest is not None and latest.checkpoint["channel_values"]["done"] == NODES
    finally:
        await asyncio.gather(*(c.close() for c in cs.values()))


async def test_openai_agent_replays_finished_model_calls_after_kill(make_mesh, open_mesh_store):
    stub = ChatStub(fail_first=1, hold_turn=1)
    url = await stub.start()
    env = {
        **ENV,
        "MESH_CHAT_BASE_URL": url,
        "MESH_CHAT_MODEL": MODEL,
        "MESH_CHAT_API_KEY": "stub-key",
    }
    cs: dict[str, MeshClient] = {}
    try:
        mesh = await make_mesh("postgres", env=env)
        store = await open_mesh_store(mesh)
        cs = {p.id: MeshClient(p.url, timeout_s=10) for p in mesh.peers}
        prompt = f"What is 6*7, and how many words are in the sentence? ({os.getpid()})"
        spec = {"agent": "framework_agents:calculator_agent", "input": prompt}
        run_id = (await cs["peer-2"].submit("openai_agent", spec))["id"]
        await asyncio.wait_for(stub.held.wait(), 30)
        victim = (await cs["peer-2"].get_run(run_id))["owner"]
        assert stub.calls(prompt, 0) == 1
        mesh.kill(victim)
        survivor = next(c for p, c in cs.items() if p != victim)

        async def second_call_in_flight() -> bool:
            return stub.calls(prompt, 1) == 2

        await eventually(second_call_in_flight, 30, "the new owner's model call")
        stub.release.set()
        run = await survivor.wait(run_id, 60)

        assert run["status"] == "succeeded", run
        assert run["owner"] != victim
        assert run["result"] == "6*7 is 42 and the text has 5 words."
        assert stub.calls(prompt, 0, 429) == 1, "the 429 was retried by the client, once"
        assert stub.calls(prompt, 0) == 1, (
            "the model call finished before the kill was not made again"
        )
        assert stub.calls(prompt, 1) == 2, "only the call cut by the kill ran again"
        journal = await store.load_steps(run_id)
        assert [s.name for s in journal] == [
            "openai_agents:model",
            "openai_agents:tool:calculator",
            "openai_agents:tool:word_count",
            "openai_agents:model",
        ]
        assert [s.epoch for s in journal[:3]] == [1, 1, 1]
        tokens = [event_data(e.data)["content"] for e in await store.read_events(run_id)]
        assert "".join(tokens) == run["result"], "tokens streamed as events, each once"
    finally:
        await asyncio.gather(*(c.close() for c in cs.values()))
        await stub.stop()


async def test_the_langgraph_example_runs_against_the_chat_configuration(
    make_mesh, open_mesh_store
):
    stub = ChatStub(fail_first=0)
    url = await stub.start()
    env = {
        "PYTHONPATH": str(HERE.parents[1]),
        "MESH_CHAT_BASE_URL": url,
        "MESH_CHAT_MODEL": MODEL,
        "MESH_CHAT_API_KEY": "stub-key",
    }
    try:
        mesh = await make_mesh("sqlite", nodes=1, env=env)
        store = await open_mesh_store(mesh)
        client = MeshClient(mesh.peers[0].url, timeout_s=10)
        prompt = f"What is 6*7, and how many words are in the sentence? ({os.getpid()})"
        spec = {
            "graph": "examples.langgraph_research:graph",
            "input": {"messages": [{"role": "user", "content": prompt}]},
        }
        try:
            run = await client.wait((await client.submit("langgraph", spec))["id"], 60)
        finally:
            await client.close()

        assert run["status"] == "succeeded", run
        answer = "6*7 is 42 and the text has 5 words."
        messages = run["result"]["messages"]
        assert [m["type"] for m in messages] == ["human", "ai", "tool", "tool", "ai"]
        assert messages[-1]["content"] == answer
        events = await store.read_events(run["id"])
        tokens = [event_data(e.data) for e in events if e.kind == "messages"]
        assert "".join(t["content"] for t in tokens if t["node"] == "model") == answer
        assert [next(iter(event_data(e.data))) for e in events if e.kind == "updates"] == [
            "model",
            "tools",
            "model",
        ]
    finally:
        await stub.stop()
