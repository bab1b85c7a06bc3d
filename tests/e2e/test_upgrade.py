"""A rolling upgrade from the previous release, under load, with real processes.

The previous release is commit 49549c1 (the last before the raftmesh
namespace: it installs top-level packages and starts as ``python -m cli up``),
checked out as a git worktree in a temporary directory with a virtualenv of
its own (old and new must not share one). A mesh of three peers of that
release takes a steady stream of runs; then each peer in turn is stopped
with SIGTERM, as a rolling update does, and started again from the same data
dir by the new code. Old and new peers share Raft (log entries, snapshots,
membership) and storage (schema, fencing) in between. Every run must succeed
and no step may run twice (tests/e2e/probe_agents.py witnesses each start).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import eventually, wait_all_terminal
from test_membership import GRACE_S, Stream, assert_each_step_ran_once, membership_env

from raftmesh.mesh.client import MeshClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS_RELEASE = "49549c1"
STEPS = 4


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The command that starts a peer of the previous release."""
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
        capture_output=True,
    )
    if found.returncode != 0:
        pytest.skip(f"commit {PREVIOUS_RELEASE} is not in this clone's history")
    root = tmp_path_factory.mktemp("previous-release")
    tree = root / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), PREVIOUS_RELEASE],
        check=True,
        capture_output=True,
    )
    try:
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        installed = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "-e", str(tree)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert installed.returncode == 0, installed.stderr[-3000:]
        python = str(venv / "bin" / "python")
        # The old release really is the old layout: no raftmesh namespace.
        check = subprocess.run(
            [
                python,
                "-P",
                "-c",
                "import cli.main, importlib.util as u; print(u.find_spec('raftmesh'))",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert check.stdout.strip() == "None"
        # The previous release takes the cluster secret from MESH_SECRET only;
        # DevMesh hands it over as a file (MESH_SECRET_FILE). -P: the working
        # directory (this checkout, with a cli/ folder of its own) must not
        # shadow the old release's packages.
        wrapper = root / "previous-peer"
        wrapper.write_text(
            "#!/bin/sh\n"
            'MESH_SECRET=$(cat "$MESH_SECRET_FILE")\n'
            "export MESH_SECRET\n"
            f'exec {python} -P -m cli "$@"\n'
        )
        wrapper.chmod(0o755)
        yield [str(wrapper)]
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
            capture_output=True,
        )


async def test_rolling_upgrade_from_the_previous_release_under_load(
    make_mesh, tmp_path, previous_release
):
    old = previous_release
    mesh = await make_mesh("postgres", command=old, env=membership_env())
    witness = tmp_path / "witness"
    clients: dict[str, MeshClient] = {}
    phases: list[str] = []
    try:
        for peer in mesh.peers:
            assert peer.process is not None and peer.process.args[:1] == old
        clients = {p.id: MeshClient(p.url, timeout_s=10) for p in mesh.peers}
        async with Stream(mesh, witness, steps=STEPS) as stream:
            await eventually(lambda: asyncio.sleep(0, len(stream.ids) >= 6), 30, "runs in flight")
            upgraded: list[str] = []
            for peer in list(mesh.peers):
                mesh.kill(peer.id, signal.SIGTERM)
                assert peer.process is not None
                code = await asyncio.to_thread(peer.process.wait, GRACE_S + 20)
                assert code == 0, f"{peer.id} (previous release) exited {code} on SIGTERM"
                mesh.set_peer_command(peer.id, None)
                mesh.restart(peer.id)
                await mesh.wait_ready(90, [peer.id])
                upgraded.append(peer.id)
                assert peer.process.args[:3] == [sys.executable, "-m", "raftmesh.cli"]
                # Mixed versions must do real work together: a run placed on
                # the new peer by whichever leader there is, and finished.
                since = len(stream.ids)

                async def new_peer_finished_one(peer_id: str = peer.id, since: int = since) -> bool:
                    runs = [await clients[peer_id].get_run(i) for i in stream.ids[since:]]
                    return any(r["owner"] == peer_id and r["status"] == "succeeded" for r in runs)

                await eventually(new_peer_finished_one, 60, f"upgraded {peer.id} to finish a run")
                info = await clients[peer.id].cluster()
                phases.append(
                    f"new: {', '.join(upgraded)}; leader {info['leader']}; term {info['term']}"
                )
            await asyncio.sleep(1)
        runs = await wait_all_terminal(clients[mesh.peers[0].id], stream.ids, timeout_s=180)
        assert_each_step_ran_once(witness, runs, STEPS)
        handed_over = [r for r in runs.values() if r["epoch"] >= 2]
        assert handed_over, "the rolling stops should have moved runs between peers"
        info = await clients[mesh.peers[0].id].cluster()
        assert {p["id"]: p["status"] for p in info["peers"]} == {p.id: "up" for p in mesh.peers}
        print(
            f"\n{len(runs)} runs across the upgrade, all succeeded, no step twice; "
            f"{len(handed_over)} handed over; " + " | ".join(phases)
        )
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()))
