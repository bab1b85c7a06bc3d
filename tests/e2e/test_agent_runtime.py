"""The agent runtime with real peer processes: durable resume, live events from
any peer across a failover, fan-out limits, process isolation, the chat agent."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from chat_stub import MODEL, ChatStub
from support import eventually, wait_all_terminal

from raftmesh.mesh.client import MeshClient, SSEMessage
from raftmesh.mesh.devmesh import DevMesh
from raftmesh.runner.payload import event_data, unpack

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def clients(mesh: DevMesh) -> dict[str, MeshClient]:
    return {p.id: MeshClient(p.url, timeout_s=10) for p in mesh.peers}


async def close_all(cs: dict[str, MeshClient]) -> None:
    await asyncio.gather(*(c.close() for c in cs.values()))


async def read_events(
    client: MeshClient, run_id: str, last: int | None, count: int | None
) -> list[SSEMessage]:
    """Up to ``count`` events (all until ``end`` if None), then drop the connection."""
    got: list[SSEMessage] = []
    async for msg in client.events(run_id, last_event_id=last):
        got.append(msg)
        if msg.event == "end" or (count is not None and len(got) == count):
            break
    return got


async def test_durable_run_resumes_and_sse_follows_through_non_owner_across_failover(
    make_mesh, open_mesh_store
):
    """A 10-step agent with a durable sleep, killed during the sleep; watched
    through peers that never own it, with the stream cut and resumed by
    Last-Event-ID before and after the failover."""
    mesh = await make_mesh("postgres")
    store = await open_mesh_store(mesh)
    cs = clients(mesh)
    try:
        spec = {"steps": 10, "step_seconds": 0.3, "sleep_after": 5, "sleep_seconds": 6}
        run_id = (await cs["peer-1"].submit("durable", spec))["id"]
        victim = await eventually(
            lambda: _owner(cs["peer-1"], run_id), 20, "the run to be assigned"
        )
        watcher = next(p for p in cs if p != victim)

        received = await read_events(cs[watcher], run_id, None, 3)
        assert [m.id for m in received] == [1, 2, 3]

        async def sleeping() -> bool:
            return any(s.name == "sleep" for s in await store.load_steps(run_id))

        await eventually(sleeping, 20, "the durable sleep to start")
        mesh.kill(victim)

        async def new_owner() -> str | None:
            owner = await _owner(cs[watcher], run_id)
            return owner if owner != victim else None

        heir = await eventually(new_owner, 30, "the run to be reassigned")
        # After the failover, watch through the survivor that does not own the run:
        # cut after three more events, then resume again to the end.
        bystander = next(p for p in cs if p not in (victim, heir))
        received += await read_events(cs[bystander], run_id, received[-1].id, 3)
        received += await read_events(cs[bystander], run_id, received[-1].id, None)
        print(f"\nfailover: {victim} -> {heir}; watched through {watcher}, then {bystander}")

        end = received[-1]
        assert end.event == "end" and end.id is None
        assert end.data["status"] == "succeeded", end.data
        stored = await store.read_events(run_id)
        got = [(m.id, m.data["kind"], m.data["data"]) for m in received[:-1]]
        assert got == [(e.seq, e.kind, event_data(e.data)) for e in stored], (
            "the watched sequence equals the stored one exactly"
        )
        assert [d["done"] for _, _, d in got] == list(range(1, 11)), (
            "each progress event exactly once, although steps 0-4 replayed after the failover"
        )
        assert end.data["last_seq"] == 10

        row = await store.get_run(run_id)
        assert row.owner != victim and row.epoch >= 2
        steps = unpack(row.result)["steps"]
        assert [s["index"] for s in steps] == list(range(10))
        assert all(s["peer"] == victim and s["epoch"] == 1 for s in steps[:5]), (
            "steps stored before the kill are replayed, not run again"
        )
        assert all(s["peer"] == row.owner and s["epoch"] == row.epoch for s in steps[5:])
        journal = await store.load_steps(run_id)
        assert [s.name for s in journal] == [f"step-{i}" for i in range(5)] + ["sleep"] + [
            f"step-{i}" for i in range(5, 10)
        ]
        timer = journal[5]
        assert timer.epoch == 1, "the timer was set once, by the first owner"
        wake_ms = unpack(timer.value)
        first_after = journal[6]
        assert first_after.at_ms >= wake_ms, "the resumed run still honoured the timer"
        # Sleeping again from zero would put step 5 about 6 s after the later of
        # wake-up and claim (at least the ~2 s failover after it); honouring the
        # stored wake-up time puts it one 0.3 s step after. Generous bound:
        late_ms = first_after.at_ms - max(wake_ms, row.started_at_ms)
        print(f"step 5 ran {late_ms} ms after max(timer due, new claim)")
        assert late_ms < 1500, f"step 5 ran {late_ms} ms after the timer was due"
    finally:
        await close_all(cs)


async def _owner(client: MeshClient, run_id: str) -> str | None:
    run = await client.get_run(run_id)
    return run["owner"] if run["status"] == "running" else None


async def test_fan_out_limits_fail_clearly_and_spare_other_runs(make_mesh, open_mesh_store):
    env = {"MESH_MAX_CHILDREN": "3", "MESH_MAX_DEPTH": "2"}
    mesh = await make_mesh("sqlite", env=env)
    store = await open_mesh_store(mesh)
    cs = clients(mesh)
    c = cs["peer-2"]
    try:
        ok = (await c.submit("fanout", {"children": 2, "levels": 2}))["id"]
        plain = (await c.submit("steps", {"steps": 3, "step_seconds": 0.1}))["id"]
        wide = (await c.submit("fanout", {"children": 4}))["id"]
        deep = (await c.submit("fanout", {"children": 1, "levels": 3}))["id"]
        grant = {"children": 2, "child_budget": {"model_calls": 3}}
        broke = (await c.submit("fanout", grant, budget={"model_calls": 5}))["id"]
        spend = {"children": 1, "spend": {"model_calls": 6}, "child_budget": {"model_calls": 0}}
        spender = (await c.submit("fanout", spend, budget={"model_calls": 5}))["id"]
        # Watched over SSE (SQLite: polling) while it runs, from a peer that may not own it.
        watched = await asyncio.wait_for(read_events(cs["peer-3"], ok, None, None), 60)
        ids = [ok, plain, wide, deep, broke, spender]
        runs = await wait_all_terminal(c, ids, timeout_s=60)

        assert runs[ok]["status"] == "succeeded"
        tree = runs[ok]["result"]
        assert tree["depth"] == 0 and [child["depth"] for child in tree["children"]] == [1, 1]
        leaves = [leaf for child in tree["children"] for leaf in child["children"]]
        assert leaves == [{"child": 0}, {"child": 1}] * 2
        assert watched[-1].event == "end" and watched[-1].data["status"] == "succeeded"
        assert [m.data["kind"] for m in watched[:-1]] == ["children"]
        assert runs[plain]["status"] == "succeeded"

        assert runs[wide]["status"] == "failed"
        assert runs[wide]["error"].startswith("FanOutLimit: ")
        assert "at most 3 children per run" in runs[wide]["error"]
        assert runs[deep]["status"] == "failed"
        assert "DepthLimit" in runs[deep]["error"] and "max depth 2" in runs[deep]["error"]
        assert runs[broke]["status"] == "failed"
        assert runs[broke]["error"] == (
            f"BudgetExhausted: run {broke}: budget exhausted: needs 3 model_calls, 2 left of 5"
        )
        assert runs[spender]["status"] == "failed"
        assert "needs 6 model_calls, 5 left of 5" in runs[spender]["error"]

        rows = await store.list_runs(limit=500)
        children: dict[str | None, list[str]] = {}
        for row in rows:
            children.setdefault(row.spec.parent_id, []).append(row.id)
        assert len(children[ok]) == 2 and all(len(children[k]) == 2 for k in children[ok])
        # Spawns before the refused one may have been submitted when the parent
        # failed (their submission is then stopped), but never a 4th child.
        assert len(children.get(wide, [])) <= 3
        (middle,) = children[deep]
        (bottom,) = children[middle]
        assert bottom not in children, "nothing was started below the depth limit"
        assert len(children.get(broke, [])) <= 1 and spender not in children
    finally:
        await close_all(cs)


async def test_isolated_agent_past_its_memory_limit_fails_and_peer_keeps_serving(make_mesh):
    mesh = await make_mesh("sqlite", nodes=1)
    peer = mesh.peers[0]
    pid = peer.process.pid
    async with MeshClient(peer.url) as c:
        steady = (await c.submit("steps", {"steps": 6, "step_seconds": 0.3}))["id"]
        hog = (
            await c.submit(
                "hog", {"mb": 800}, isolation="process", memory_limit_mb=300, max_attempts=2
            )
        )["id"]
        runs = await wait_all_terminal(c, [steady, hog], timeout_s=60)
        assert runs[hog]["status"] == "failed" and runs[hog]["attempts"] == 2
        assert "MemoryError" in runs[hog]["error"] and "300 MB" in runs[hog]["error"]
        assert runs[steady]["status"] == "succeeded"
        small = (await c.submit("hog", {"mb": 20}, isolation="process", memory_limit_mb=300))["id"]
        done = await c.wait(small, 30)
        assert done["status"] == "succeeded" and done["result"]["allocated_mb"] == 20
        assert done["result"]["pid"] != pid, "the agent ran in its own process"
        assert peer.running and peer.process.pid == pid and await c.healthz()


async def test_chat_agent_two_tools_429_retried_no_repeated_call_after_kill(
    make_mesh, open_mesh_store
):
    stub = ChatStub(fail_first=1, hold_turn=1)
    url = await stub.start()
    env = {"MESH_CHAT_BASE_URL": url, "MESH_CHAT_MODEL": MODEL, "MESH_CHAT_API_KEY": "stub-key"}
    cs: dict[str, MeshClient] = {}
    try:
        mesh = await make_mesh("postgres", env=env)
        store = await open_mesh_store(mesh)
        cs = clients(mesh)
        prompt = f"What is 6*7, and how many words are in the sentence? ({os.getpid()})"
        chat_input = {"prompt": prompt, "tools": ["calculator", "word_count"]}
        budget = {"model_calls": 4, "tokens": 500}
        run_id = (await cs["peer-3"].submit("chat", chat_input, budget=budget))["id"]
        await asyncio.wait_for(stub.held.wait(), 30)
        victim = (await cs["peer-3"].get_run(run_id))["owner"]
        assert stub.calls(prompt, 0, 429) == 1 and stub.calls(prompt, 0) == 1
        mesh.kill(victim)
        survivor = next(c for p, c in cs.items() if p != victim)

        async def second_call_in_flight() -> bool:
            return stub.calls(prompt, 1) == 2

        await eventually(second_call_in_flight, 30, "the new owner's model call")
        stub.release.set()
        run = await survivor.wait(run_id, 60)

        assert run["status"] == "succeeded", run
        assert run["owner"] != victim
        assert run["result"]["answer"] == "6*7 is 42 and the text has 5 words."
        assert stub.calls(prompt, 0, 429) == 1, "the 429 was retried, once"
        assert stub.calls(prompt, 0) == 1, "the finished first model call was not repeated"
        assert stub.calls(prompt, 1) == 2, "only the call cut by the kill ran again"
        assert run["result"]["usage"] == {"model_calls": 2, "tokens": 42 + 69}
        roles = [m["role"] for m in run["result"]["messages"]]
        assert roles == ["user", "assistant", "tool", "tool", "assistant"]

        journal = await store.load_steps(run_id)
        assert [s.name for s in journal] == ["model", "tool:calculator", "tool:word_count", "model"]
        assert [s.epoch for s in journal[:3]] == [1, 1, 1]
        events = [(e.kind, event_data(e.data)) for e in await store.read_events(run_id)]
        kinds = [k for k, _ in events]
        assert kinds.count("model.retry") == 1 and kinds.count("tool") == 2
        text = "".join(d["text"] for k, d in events if k == "token")
        assert text == run["result"]["answer"], "tokens streamed as events, each once"
    finally:
        await close_all(cs)
        await stub.stop()


GREET_MODULE = """
async def greet(ctx, input):
    return {"hello": input["name"], "peer": ctx.peer_id}


async def shout(ctx, input):
    return str(input).upper()
"""


def install_agent_distribution(site: Path) -> None:
    """A distribution declaring an entry point in ``raftmesh.agents``, as pip would
    leave it in site-packages: a module and its dist-info."""
    site.mkdir()
    (site / "greet_pkg.py").write_text(GREET_MODULE)
    info = site / "greet_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: greet-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[raftmesh.agents]\ngreet = greet_pkg:greet\n")


async def test_agent_discovery_and_submission_options(make_mesh, tmp_path):
    """peer-1 has an entry-point agent and a module:function agent, peer-2 has
    neither: either peer accepts them, only peer-1 runs them, and an agent no
    peer has is a 400."""
    site = tmp_path / "site"
    install_agent_distribution(site)
    extra = {"PYTHONPATH": str(site), "MESH_AGENT_MODULES": "greet_pkg:shout"}
    mesh = await make_mesh("sqlite", nodes=2, peer_env={"peer-1": extra})
    url = mesh.url("peer-2")
    async with MeshClient(url) as c, aiohttp.ClientSession() as http:
        greet = (await c.submit("greet", {"name": "ada"}))["id"]
        shout = (await c.submit("shout", "quiet", isolation="process"))["id"]
        runs = await wait_all_terminal(c, [greet, shout], timeout_s=30)
        assert runs[greet]["result"] == {"hello": "ada", "peer": "peer-1"}
        assert runs[greet]["owner"] == runs[shout]["owner"] == "peer-1"
        assert runs[shout]["result"] == "QUIET", "module:function agents load in isolation too"

        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "raftmesh.cli",
            "agents",
            "--peer",
            url,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await cli.communicate()
        lines = dict(line.split(maxsplit=2)[::2] for line in out.decode().splitlines())
        assert "greet" in lines["peer-1"] and "shout" in lines["peer-1"]
        assert "greet" not in lines["peer-2"] and "chat" in lines["peer-2"]

        for body, code, needle in [
            ({"agent": "nope", "input": 1}, "unknown_agent", "no peer of this mesh has it"),
            ({"agent": "echo", "input": 1, "budget": {"dollars": 3}}, "bad_request", "budget"),
            ({"agent": "echo", "input": 1, "isolation": "vm"}, "bad_request", "isolation"),
            ({"agent": "echo", "input": 1, "memory_limit_mb": 1}, "bad_request", "memory_limit_mb"),
        ]:
            async with http.post(f"{url}/v1/runs", json=body) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
                assert error["code"] == code and needle in error["message"], error
        async with http.get(f"{url}/v1/runs/nope/events") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "run_not_found"
        bad_id = {"Last-Event-ID": "x"}
        async with http.get(f"{url}/v1/runs/{greet}/events", headers=bad_id) as resp:
            assert resp.status == 400 and "Last-Event-ID" in (await resp.json())["error"]["message"]


async def test_examples_load_and_the_uptime_watch_runs(make_mesh):
    modules = "examples.researcher,examples.support_desk,examples.uptime_watch"
    env = {"PYTHONPATH": str(REPO), "MESH_AGENT_MODULES": modules}
    mesh = await make_mesh("sqlite", nodes=1, env=env)
    peer = mesh.peers[0]
    async with MeshClient(peer.url) as c:
        assert {"researcher", "support", "uptime_watch"} <= set((await c.agents())["agents"])
        spec = {"url": f"{peer.url}/healthz", "checks": 3, "every_s": 0.3}
        run_id = (await c.submit("uptime_watch", spec))["id"]
        events = await asyncio.wait_for(read_events(c, run_id, None, None), 30)
        assert [m.data["data"]["n"] for m in events[:-1]] == [1, 2, 3]
        run = await c.get_run(run_id)
        assert run["result"] == {"url": spec["url"], "checks": 3, "up": 3, "availability": 1.0}

        async def mesh_cli(*args: str) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "raftmesh.cli",
                *args,
                "--peer",
                peer.url,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            return proc.returncode, out.decode()

        code, out = await mesh_cli("submit", "uptime_watch", "--watch", "--input", json.dumps(spec))
        lines = out.splitlines()
        assert code == 0, out
        assert lines[0].startswith("run ") and lines[0].endswith(" queued")
        assert [line.split()[1] for line in lines[1:4]] == ["check"] * 3
        assert lines[-1] == "run succeeded"
        code, out = await mesh_cli("watch", run_id)
        assert code == 0 and out.splitlines()[-1] == "run succeeded"
        assert [line.split()[0] for line in out.splitlines()[:-1]] == ["1", "2", "3"]
        code, out = await mesh_cli("submit", "fail", "--watch", "--input", "1")
        assert code == 1 and out.splitlines()[-1].startswith(
            "run failed: RuntimeError: asked to fail"
        )
