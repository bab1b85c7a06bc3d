"""A dead letter retried through the API comes back as it was submitted: here,
isolated in a process of its own under its memory limit (the retry used to
rebuild it from the storage row, which had neither)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import wait_all_terminal

from raftmesh.mesh.client import MeshClient

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
