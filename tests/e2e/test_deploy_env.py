"""Voters configured the way deploy/compose/all-in-one.yml and the voter
StatefulSet configure them: through the environment only, every voter given
the same MESH_PEERS with itself included, and `up` as the only argument (the
image's CMD). They must form one mesh of three voters."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import eventually

from raftmesh.mesh.client import MeshClient

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def env_voters(tmp_path: Path) -> Iterator[tuple[list[str], list[str]]]:
    """Three `mesh up` processes configured by MESH_* alone; (raft, http) addresses."""
    ports = _free_ports(6)
    rafts = [f"127.0.0.1:{p}" for p in ports[:3]]
    https = [f"127.0.0.1:{p}" for p in ports[3:]]
    shared = {
        "MESH_PEERS": ",".join(rafts),
        "MESH_STORAGE": f"sqlite:///{tmp_path / 'mesh.db'}",
        "MESH_SECRET": secrets.token_hex(16),
        "MESH_SLOTS": "2",
    }
    procs = []
    for i in range(3):
        env = {
            **os.environ,
            **shared,
            "MESH_ID": f"voter-{i}",
            "MESH_RAFT": rafts[i],
            "MESH_HTTP": https[i],
            "MESH_DATA_DIR": str(tmp_path / f"voter-{i}"),
        }
        with open(tmp_path / f"voter-{i}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "raftmesh.cli", "up"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    yield rafts, https
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_voters_from_environment_alone_with_themselves_in_mesh_peers(env_voters):
    rafts, https = env_voters
    clients = [MeshClient(f"http://{h}", timeout_s=3) for h in https]
    try:
        for client in clients:
            await eventually(client.readyz, 60, f"{client.base_url} ready")
        info = await clients[0].cluster()
        assert sorted(info["voters"]) == sorted(rafts)
        assert {p["id"]: p["status"] for p in info["peers"]} == {
            f"voter-{i}": "up" for i in range(3)
        }
        run = await clients[2].submit("echo", {"hello": "compose"})
        assert (await clients[1].wait(run["id"], 30))["status"] == "succeeded"
    finally:
        for client in clients:
            await client.close()
