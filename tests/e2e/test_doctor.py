"""``mesh doctor`` against a real 3-peer mesh: all pass, then a peer killed -9."""

from __future__ import annotations

import json

import pytest
from test_membership import mesh_cli

from raftmesh.mesh.client import MeshClient

pytestmark = pytest.mark.slow


async def test_doctor_passes_on_a_healthy_mesh_and_fails_when_a_peer_is_killed(make_mesh):
    mesh = await make_mesh("sqlite")
    async with MeshClient(mesh.url("peer-1")) as client:
        leader = (await client.cluster())["leader"]
    code, out, err = await mesh_cli(
        "doctor", "--peer", mesh.url("peer-1"), "--json", "--window", "1"
    )
    assert code == 0, (out, err)
    checks = {c["name"]: c for c in json.loads(out)}
    assert {c["status"] for c in checks.values()} == {"pass"}, checks
    assert checks["leader"]["detail"].startswith(f"{leader} leads")
    assert {f"peer peer-{i} (voter)" for i in (1, 2, 3)} <= set(checks)
    assert checks["lease churn"]["detail"] == "no owner changed in the last 1 s"

    victim = next(p.id for p in mesh.peers if p.id not in (leader, "peer-1"))
    mesh.kill(victim)
    code, out, err = await mesh_cli("doctor", "--peer", mesh.url("peer-1"))
    assert code == 1, (out, err)
    assert "fail" in out and victim in out
    code, out, err = await mesh_cli("doctor", "--peer", mesh.url("peer-1"), "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert checks[f"peer {victim} (voter)"]["status"] == "fail"
    assert checks["quorum"]["status"] == "warn", "2 of 3 voters: one more loss stops the mesh"
    assert checks["leader"]["status"] == "pass"
