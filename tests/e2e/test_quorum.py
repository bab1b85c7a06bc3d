"""Quorum under membership changes (issue 10, finding 4), with real peers.

Joins to made-up Raft addresses must never cost the mesh its quorum; joins
take the admin scope; a join that would leave the up voters short of a
majority is refused; and a mesh that lost its majority for good is rebuilt
from its surviving data dirs with ``mesh recover``, losing nothing acknowledged.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from support import eventually, submit_retrying, wait_all_terminal

from raftmesh.mesh.client import MeshClient, MeshHTTPError

pytestmark = pytest.mark.slow

E2E_DIR = Path(__file__).resolve().parent
ADMIN = "admin-token-for-the-test"


async def mesh_cli(*args: str, timeout_s: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "raftmesh.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_joins_to_made_up_addresses_never_cost_the_quorum(make_mesh):
    mesh = await make_mesh("postgres", env={"MESH_API_TOKEN": ADMIN, "MESH_JOIN_TIMEOUT_S": "8"})
    admin = MeshClient(mesh.url("peer-1"), ADMIN, timeout_s=30)
    anonymous = MeshClient(mesh.url("peer-2"), timeout_s=10)
    try:
        # No admin token: refused, and nothing changes.
        with pytest.raises(MeshHTTPError) as denied:
            await anonymous.join("intruder", "203.0.113.9:8001", "203.0.113.9:7001", "voter")
        assert denied.value.status == 401, denied.value
        assert "intruder" not in {p["id"] for p in (await admin.cluster())["peers"]}

        # Three joins naming Raft addresses nobody listens on (the case).
        answers = []
        for i in (1, 2, 3):
            try:
                raft, http = f"203.0.113.{i}:7001", f"203.0.113.{i}:8001"
                answers.append(await admin.join(f"bogus-{i}", http, raft, "voter"))
            except MeshHTTPError as exc:
                answers.append(exc)
        # The mesh keeps its quorum: no bogus voter, every real peer ready,
        # submissions succeed.
        info = await admin.cluster()
        assert sorted(info["voters"]) == sorted(p.raft for p in mesh.peers), info["voters"]
        for peer in mesh.peers:
            async with MeshClient(peer.url) as c:
                assert await c.readyz(), f"{peer.id} not ready after the bogus joins"
        ids = [(await admin.submit("echo", {"n": i}))["id"] for i in range(5)]
        done = await wait_all_terminal(admin, ids, timeout_s=30)
        assert {r["status"] for r in done.values()} == {"succeeded"}
        assert answers[0]["learner"] and answers[1]["learner"], answers
        third = answers[2]
        assert isinstance(third, MeshHTTPError) and third.status == 409, third
        assert "could not form a majority" in third.message, third.message

        # The reservations expire, and a join fits again.
        async def expired() -> bool:
            peers = {p["id"]: p["status"] for p in (await admin.cluster())["peers"]}
            return peers.get("bogus-1") == "left" and peers.get("bogus-2") == "left"

        await eventually(expired, 30, "the bogus reservations to expire")
        again = await admin.join("bogus-3", "203.0.113.3:8001", "203.0.113.3:7001", "voter")
        assert again["learner"]
        info = await admin.cluster()
        assert len(info["voters"]) == 3
        after = await submit_retrying(admin, "echo", {"after": "bogus joins"})
        assert (await admin.wait(after["id"], 30))["status"] == "succeeded"

        # A real `mesh join` that cannot connect (a wrong cluster secret) stays a
        # learner, never votes, and exits 1 with the reason once its join expires.
        originals = list(mesh.peers)
        wrong = mesh.dir / "wrong.secret"
        wrong.write_text("not-the-mesh-secret\n")
        mesh.set_peer_env("peer-4", {"MESH_SECRET_FILE": str(wrong)})
        joiner = mesh.join("peer-1", peer_id="peer-4")
        assert joiner.process is not None
        assert await asyncio.to_thread(joiner.process.wait, 40) == 1
        assert "join failed: not promoted within 8 s" in joiner.log_path.read_text()
        info = await admin.cluster()
        assert sorted(info["voters"]) == sorted(p.raft for p in originals)
        for peer in originals:
            async with MeshClient(peer.url) as c:
                assert await c.readyz(), peer.id
    finally:
        await admin.close()
        await anonymous.close()


@pytest.mark.slow
async def test_a_mesh_that_lost_its_majority_is_rebuilt_from_the_survivors(make_mesh, tmp_path):
    env = {"PYTHONPATH": str(E2E_DIR), "MESH_AGENT_MODULES": "probe_agents"}
    mesh = await make_mesh("postgres", nodes=5, env=env)
    leader_id = (await _cluster(mesh.url("peer-1")))["leader"]
    followers = [p for p in mesh.peers if p.id != leader_id]
    survivors, doomed = followers[:2], [mesh.peer(leader_id), *followers[2:]]
    client = MeshClient(survivors[0].url, timeout_s=10)
    try:
        slow = {"steps": 4, "step_seconds": 0.5, "log": str(tmp_path / "witness")}
        acked = [(await client.submit("probe_steps", slow))["id"] for _ in range(15)]
        acked += [(await client.submit("echo", {"n": i}))["id"] for i in range(10)]

        dying = {p.id for p in doomed}

        async def running_owners() -> dict[str, str]:
            runs = [await client.get_run(i) for i in acked]
            return {r["id"]: r["owner"] for r in runs if r["status"] == "running"}

        async def spread() -> bool:
            return set((await running_owners()).values()) >= dying

        await eventually(spread, 20, "runs running on the peers about to die")
        # The leader and two followers die for good: 2 of 5 voters are left.
        for peer in doomed:
            mesh.kill(peer.id)
        # As the survivors saw it when the others died.
        orphaned = [i for i, owner in (await running_owners()).items() if owner in dying]
        assert orphaned, "no run was left running on the dead peers"
        with pytest.raises(MeshHTTPError) as stuck:
            await client.submit("echo", {"n": "no quorum"})
        assert stuck.value.status == 503
        # The procedure (README, "Recovering a mesh that lost its majority").
        for peer in survivors:
            mesh.kill(peer.id)
        surviving = ",".join(p.raft for p in survivors)
        for peer in survivors:
            code, out, err = await mesh_cli(
                "recover", "--data-dir", str(peer.data_dir), "--voters", surviving
            )
            assert code == 0 and "voters pinned" in out, (code, out, err)
        for peer in survivors:
            mesh.restart(peer.id)
        await mesh.wait_ready(60, [p.id for p in survivors])
        info = await client.cluster()
        assert sorted(info["voters"]) == sorted(p.raft for p in survivors)

        runs = await wait_all_terminal(client, acked, timeout_s=120)
        assert {r["status"] for r in runs.values()} == {"succeeded"}, runs
        assert {runs[i]["owner"] for i in orphaned} <= {p.id for p in survivors}

        async def lost_ones_left() -> bool:
            peers = {p["id"]: p["status"] for p in (await client.cluster())["peers"]}
            return all(peers[p.id] == "left" for p in doomed)

        await eventually(lost_ones_left, 30, "the lost voters to be removed")
        # The recovered mesh is an ordinary mesh: a replacement voter joins (with
        # a fresh data dir), and a restarted survivor keeps the new voter set.
        replacement = mesh.join(survivors[0].id, peer_id="peer-6")
        await mesh.wait_ready(60, ["peer-6"])
        voters = sorted([*(p.raft for p in survivors), replacement.raft])
        assert sorted((await client.cluster())["voters"]) == voters
        mesh.restart(survivors[1].id)
        await mesh.wait_ready(60, [survivors[1].id])
        async with MeshClient(survivors[1].url) as other:
            assert sorted((await other.cluster())["voters"]) == voters
        after = await submit_retrying(client, "echo", {"after": "recovery"})
        assert (await client.wait(after["id"], 30))["status"] == "succeeded"
        assert not any((p.data_dir / "recovery.json").exists() for p in survivors), "not sealed"
    finally:
        await client.close()


async def _cluster(url: str) -> dict:
    async with MeshClient(url) as c:
        return await c.cluster()
