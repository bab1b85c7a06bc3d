"""``GET /v1/runs?status=waiting``: the waiting runs of the committed state,
each without an owner (found by the chaos harness, whose sampler asks this for
invariant 10 and was answered 400 "unknown status")."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import eventually

from raftmesh.mesh.client import MeshClient

pytestmark = pytest.mark.slow

E2E_DIR = Path(__file__).resolve().parent
PROBES = {"PYTHONPATH": str(E2E_DIR), "MESH_AGENT_MODULES": "probe_agents"}


async def test_waiting_runs_are_listed_by_status_without_an_owner(
    make_mesh, tmp_path: Path
) -> None:
    mesh = await make_mesh("postgres", env=PROBES)
    async with MeshClient(mesh.peers[0].url) as client:
        witness = tmp_path / "witness.log"
        run_id = (
            await client.submit("probe_wait", {"log": str(witness), "waits": [{"signal": "go"}]})
        )["id"]

        async def listed() -> list[dict] | None:
            runs = (await client.list_runs(status="waiting"))["runs"]
            return runs or None

        [run] = await eventually(listed, 30, "the run to be listed as waiting")
        assert (run["id"], run["status"], run["owner"]) == (run_id, "waiting", None)
        assert (await client.list_runs(status="paused"))["runs"] == []
        await client.signal(run_id, "go", 1)
        assert (await client.wait(run_id, 60))["status"] == "succeeded"
        assert (await client.list_runs(status="waiting"))["runs"] == []
