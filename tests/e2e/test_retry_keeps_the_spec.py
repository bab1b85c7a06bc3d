"""A dead letter retried through the API comes back as it was submitted: here,
isolated in a process of its own under its memory limit (the retry used to
rebuild it from the storage row, which had neither)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import eventually, wait_all_terminal

from raftmesh.mesh.client import MeshClient, MeshHTTPError

pytestmark = pytest.mark.slow

E2E_DIR = Path(__file__).parent


async def test_a_retried_dead_letter_runs_isolated_with_its_memory_limit(
    make_mesh, tmp_path: Path
) -> None:
    env = {"PYTHONPATH": str(E2E_DIR), "MESH_AGENT_MODULES": "probe_agents"}
    mesh = await make_mesh("postgres", nodes=1, env=env)
    gate = tmp_path / "fail-while-here"
    gate.write_text("")
    async with MeshClient(mesh.url("peer-1")) as client:
        run = await client.submit(
            "probe_limits",
            {"fail_while": str(gate)},
            isolation="process",
            memory_limit_mb=300,
            session="s-7",
            max_attempts=1,
            # The key's run is this one: its retry must run it again, not be
            # answered with itself (it used to stay queued in storage only).
            idempotency_key="nightly-7",
        )
        failed = (await wait_all_terminal(client, [run["id"]], timeout_s=60))[run["id"]]
        assert failed["status"] == "failed", failed
        gate.unlink()
        await client.retry(run["id"])
        done = (await wait_all_terminal(client, [run["id"]], timeout_s=60))[run["id"]]
    assert done["status"] == "succeeded", done
    peer_pid = mesh.peers[0].process.pid
    assert done["result"]["pid"] != peer_pid, "the retry ran inside the peer, not isolated"
    assert done["result"]["rlimit_as"] == 300 << 20, "the retry lost its memory limit"


async def test_a_retry_refused_for_good_leaves_the_dead_letter_as_it_was(
    make_mesh, tmp_path: Path
) -> None:
    """A retry the mesh refuses (here the tenant's queue is full) must not
    leave the run reopened in storage but absent from every replica: each
    peer then took it for its own replica lagging and answered 503 to every
    pause or signal, for good (found by schemathesis)."""
    env = {
        "PYTHONPATH": str(E2E_DIR),
        "MESH_AGENT_MODULES": "probe_agents",
        "MESH_SLOTS": "1",
        "MESH_TENANT_MAX_QUEUED": "default=1",
    }
    mesh = await make_mesh("postgres", nodes=1, env=env)
    gate = tmp_path / "fail-while-here"
    gate.write_text("")
    async with MeshClient(mesh.url("peer-1")) as client:
        run = await client.submit("probe_limits", {"fail_while": str(gate)}, max_attempts=1)
        failed = (await wait_all_terminal(client, [run["id"]], timeout_s=60))[run["id"]]
        assert failed["status"] == "failed", failed
        await client.submit("sleep", {"seconds": 60})  # takes the slot
        await eventually(lambda: _running(client), 30, "the sleeper running")
        await client.submit("sleep", {"seconds": 60})  # fills the queue
        with pytest.raises(MeshHTTPError) as refused:
            await client.retry(run["id"])
        assert refused.value.status == 429, refused.value
        after = await client.get_run(run["id"])
        assert (after["status"], after["error"]) == ("failed", failed["error"]), after
        for attempt in (client.pause(run["id"]), client.signal(run["id"], "go", 1)):
            with pytest.raises(MeshHTTPError) as ended:
                await attempt
            assert ended.value.status == 409, ended.value


async def _running(client: MeshClient) -> bool:
    cluster = await client.cluster()
    return bool(cluster["runs"]["running"])
