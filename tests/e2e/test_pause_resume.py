"""An operator's pause and resume end to end (issue 11): real peers behind TLS
with tenant tokens, real PostgreSQL, real HTTP, and the ``mesh`` command.

A running run is released at its next step boundary and parked paused with
no owner and no slot; after resume its checkpointed steps are not run again
(the witness file of tests/e2e/probe_agents.py shows every step's start). A
queued run and a waiting one pause at once; a signal sent while paused is
kept, and the resumed run goes on with it.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from probe_agents import read_witness
from support import eventually, wait_all_terminal

from raftmesh.chaos.secure import SecureSetup, make_secure_setup
from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.storage import Store, open_store

pytestmark = pytest.mark.slow

E2E_DIR = Path(__file__).resolve().parent
PROBES = {"PYTHONPATH": str(E2E_DIR), "MESH_AGENT_MODULES": "probe_agents"}
STEPS = 6


def starts(witness: Path, run_id: str) -> Counter[int]:
    return Counter(
        i for r, i, _, _, what in read_witness(str(witness)) if r == run_id and what == "start"
    )


async def status_is(client: MeshClient, run_id: str, status: str) -> dict[str, Any] | None:
    run = await client.get_run(run_id)
    return run if run["status"] == status else None


async def refused(call: Any) -> int:
    with pytest.raises(MeshHTTPError) as exc:
        await call
    return exc.value.status


async def mesh_command(url: str, token: str, ca: Path, *args: str) -> tuple[int, str]:
    """The ``mesh`` command in its own process, as an operator runs it."""
    env = {**os.environ, "MESH_API_TOKEN": token, "MESH_CA": str(ca), "MESH_PEER_URL": url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "raftmesh.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode()


async def test_pause_and_resume_running_queued_and_waiting_runs(make_mesh, tmp_path: Path) -> None:
    setup = make_secure_setup(tmp_path / "secure")
    mesh = await make_mesh("postgres", env={**setup.peer_env(), **PROBES})
    urls = [p.url for p in mesh.peers]
    alpha_token = setup.tenant_tokens["alpha"]
    alpha = MeshClient(urls[0], alpha_token, ca=str(setup.ca))
    beta = MeshClient(urls[1], setup.tenant_tokens["beta"], ca=str(setup.ca))
    admin = MeshClient(urls[2], setup.admin_token, ca=str(setup.ca))
    witness = tmp_path / "witness.log"
    store: Store = open_store(mesh.storage)
    await store.open()
    try:
        # -- a running multi-step run: released at a step boundary --------
        steps_input = {"steps": STEPS, "step_seconds": 0.4, "log": str(witness)}
        run_id = (await alpha.submit("probe_steps", steps_input))["id"]

        async def two_steps_in() -> bool:
            run = await alpha.get_run(run_id)
            return run["status"] == "running" and len(await store.load_steps(run_id)) >= 2

        await eventually(two_steps_in, 60, "the run's first two steps")
        assert await refused(beta.pause(run_id)) == 404, "another tenant's run"
        paused = await alpha.pause(run_id)
        assert paused["id"] == run_id
        assert paused["status"] == "paused" or (
            paused["status"] == "running" and paused["pause_requested"] is True
        ), paused
        run = await eventually(lambda: status_is(alpha, run_id, "paused"), 30, "the run paused")
        assert run["owner"] is None and run["pause_requested"] is False, run
        assert run["waiting_for"] == "an operator's resume" and run["wait"] is None, run
        cluster = await admin.cluster()
        assert cluster["runs"]["paused"] == 1 and cluster["queue"]["depth"] == 0, cluster
        assert sum(p["running"] for p in cluster["peers"]) == 0, "a paused run holds no slot"
        assert [r["id"] for r in cluster["queue"]["suspended"]["runs"]] == [run_id]
        done_before = len(await store.load_steps(run_id))
        assert 2 <= done_before < STEPS
        await asyncio.sleep(1.0)
        assert len(await store.load_steps(run_id)) == done_before, "no step runs while paused"
        assert (await alpha.get_run(run_id))["status"] == "paused"

        assert await refused(beta.resume(run_id)) == 404, "another tenant's run"
        resumed = await alpha.resume(run_id)
        assert resumed["status"] in ("queued", "running"), resumed
        done = await wait_all_terminal(alpha, [run_id], timeout_s=60)
        assert done[run_id]["status"] == "succeeded", done
        journal = await store.load_steps(run_id)
        assert [s.seq for s in journal] == list(range(STEPS)), "each step journaled once"
        epochs = [s.epoch for s in journal]
        assert len(set(epochs[:done_before])) == 1 and min(epochs[done_before:]) > epochs[0]
        assert starts(witness, run_id) == Counter(range(STEPS)), "a checkpointed step ran again"

        # -- 404 and 409 ----------------------------------------------------
        assert await refused(alpha.pause(run_id)) == 409, "an ended run"
        assert await refused(alpha.resume(run_id)) == 409, "an ended run"
        assert await refused(beta.pause(run_id)) == 404, "ended, and still not beta's"
        assert await refused(alpha.pause("no-such-run")) == 404
        assert await refused(alpha.resume("no-such-run")) == 404

        # -- a queued run (no peer offers its label) pauses at once -------
        stuck = (await alpha.submit("probe_steps", steps_input, labels={"gpu": "none-such"}))["id"]
        assert (await alpha.get_run(stuck))["status"] == "queued"
        assert await refused(alpha.resume(stuck)) == 409, "a queued run is not paused"
        assert (await alpha.pause(stuck))["status"] == "paused"
        assert (await alpha.pause(stuck))["status"] == "paused", "pausing twice is harmless"

        # admin reads through another peer, whose replica may apply the
        # change a moment after alpha's peer answered: wait for it.
        async def depth_is(n: int) -> bool:
            return (await admin.cluster())["queue"]["depth"] == n

        await eventually(lambda: depth_is(0), 10, "a paused run is not queue depth")
        assert (await alpha.resume(stuck))["status"] == "queued"
        await eventually(lambda: depth_is(1), 10, "the resumed run back in the queue")
        await alpha.cancel(stuck)

        # -- a waiting run: paused in its wait, signalled, resumed ---------
        waits = [{"signal": "go"}]
        waiter = (await alpha.submit("probe_wait", {"log": str(witness), "waits": waits}))["id"]
        run = await eventually(lambda: status_is(alpha, waiter, "waiting"), 60, "the run waiting")
        assert run["wait"] == {
            "kind": "signal",
            "due_at": None,
            "signal": "go",
            "children": None,
            "children_total": None,
        }, run
        assert run["waiting_for"] == "signal 'go'", run
        cluster = await admin.cluster()
        assert cluster["queue"]["depth"] == 0, "a waiting run is not queue depth"
        assert cluster["queue"]["suspended"]["waiting"] == 1, cluster["queue"]
        await gauge_is(urls[2], setup, "raftmesh_waiting_runs", 1.0)

        code, out = await mesh_command(urls[1], alpha_token, setup.ca, "pause", waiter)
        assert code == 0 and json.loads(out)["status"] == "paused", out
        run = await alpha.get_run(waiter)
        assert run["wait"]["signal"] == "go", "a run paused in a wait keeps it"
        assert run["waiting_for"] == "an operator's resume (paused while waiting for signal 'go')"
        await gauge_is(urls[2], setup, "raftmesh_paused_runs", 1.0)

        code, out = await mesh_command(
            urls[0], alpha_token, setup.ca, "signal", waiter, "go", "--data", '{"n": 1}'
        )
        assert code == 0 and json.loads(out)["seq"] == 0, out
        code, out = await mesh_command(
            urls[0], alpha_token, setup.ca, "signal", waiter, "go", "--data", "{bad"
        )
        assert code != 0 and out.strip().count("\n") == 0 and "not valid JSON" in out, out
        await asyncio.sleep(1.0)
        assert (await alpha.get_run(waiter))["status"] == "paused", "a signal does not resume"

        code, out = await mesh_command(urls[2], alpha_token, setup.ca, "resume", waiter)
        assert code == 0 and json.loads(out)["status"] in ("queued", "running"), out
        done = await wait_all_terminal(alpha, [waiter], timeout_s=60)
        assert done[waiter]["status"] == "succeeded", done
        assert done[waiter]["result"] == {"got": [{"n": 1}]}, done
        assert starts(witness, waiter) == Counter(range(2)), "a checkpointed step ran again"
        code, out = await mesh_command(urls[2], alpha_token, setup.ca, "resume", waiter)
        assert code == 1 and "409" in out, out
    finally:
        await store.close()
        for c in (alpha, beta, admin):
            await c.close()


async def gauge_is(url: str, setup: SecureSetup, name: str, value: float) -> None:
    async def check() -> bool:
        return await metric(url, setup, name) == value

    await eventually(check, 10, f"{name} at {value} on {url}")


async def metric(url: str, setup: SecureSetup, name: str) -> float | None:
    """One unlabelled sample of ``name`` as this peer exports it."""
    ctx = ssl.create_default_context(cafile=str(setup.ca))
    headers = {"Authorization": f"Bearer {setup.admin_token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.get(f"{url}/metrics", ssl=ctx) as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None
