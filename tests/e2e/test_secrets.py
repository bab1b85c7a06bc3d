"""Security of a peer as another local process sees it: the Raft port, the
secret and the files on disk, argv, and what an isolated agent inherits.

Peers are real processes. Some are started with a bare ``mesh up`` (no
secret, as a developer would), under umask 022 so that file modes are the
peer's doing, not the test runner's.
"""

from __future__ import annotations

import base64
import os
import pickle
import socket
import stat
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from support import PG_URL, eventually, wait_all_terminal

from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh

pytestmark = pytest.mark.slow

E2E_DIR = Path(__file__).resolve().parent
OLD_DEV_SECRET = "raftmesh-insecure-development-secret"
# pysyncobj's key derivation (pysyncobj/encryptor.py), copied so the test
# forges frames exactly as an attacker knowing the password would.
SYNCOBJ_SALT = b"\x15%q\xe6\xbb\x02\xa6\xf8\x13q\x90\xcf6+\x1e\xeb"


def fernet_for(password: str) -> Fernet:
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=SYNCOBJ_SALT, iterations=100000)
    return Fernet(base64.urlsafe_b64encode(kdf.derive(password.encode())))


class MakeDir:
    """Unpickling this creates ``path``: the witness of code run by a frame."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.path,))


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class BarePeer:
    process: subprocess.Popen[bytes]
    raft: str
    url: str
    data_dir: Path
    db: Path
    log: Path


@pytest.fixture
def bare_peers(tmp_path: Path) -> Iterator[list[BarePeer]]:
    """Start peers with ``start(name)``: `mesh up` alone, no secret given."""
    peers: list[BarePeer] = []
    yield peers
    for peer in peers:
        if peer.process.poll() is None:
            peer.process.terminate()
    for peer in peers:
        try:
            peer.process.wait(10)
        except subprocess.TimeoutExpired:
            peer.process.kill()
            peer.process.wait()


def start_bare(
    peers: list[BarePeer], root: Path, name: str, ports: tuple[int, int] | None = None
) -> BarePeer:
    raft_port, http_port = ports or free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"PYTHONUNBUFFERED": "1", "MESH_LOG_LEVEL": "info"})
    data_dir, db, log = root / name, root / f"{name}.db", root / f"{name}.log"
    argv = [
        sys.executable,
        "-m",
        "raftmesh.cli",
        "up",
        "--id",
        name,
        "--raft",
        f"127.0.0.1:{raft_port}",
        "--http",
        f"127.0.0.1:{http_port}",
        "--data-dir",
        str(data_dir),
        "--storage",
        f"sqlite:///{db}",
    ]
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, umask=0o022)
    peer = BarePeer(
        process, f"127.0.0.1:{raft_port}", f"http://127.0.0.1:{http_port}", data_dir, db, log
    )
    peers.append(peer)
    return peer


async def ready(peer: BarePeer) -> None:
    async def check() -> bool:
        assert peer.process.poll() is None, peer.log.read_text()
        async with MeshClient(peer.url, timeout_s=2) as c:
            return await c.readyz()

    await eventually(check, 60, f"{peer.url} to be ready")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(root: Path, pattern: str = "*") -> dict[str, int]:
    return {p.name: mode(p) for p in root.glob(pattern) if p.is_file()}


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read()


def raft_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the far end closes ``sock`` within the time (reading what it sends)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


async def test_peers_without_secret_make_their_own_and_keep_files_private(
    bare_peers: list[BarePeer], tmp_path: Path
) -> None:
    """Two peers started with no secret each get a random one, in a 0600 file
    of a 0700 data dir, as are the journal, voters.json and the SQLite files."""
    one = start_bare(bare_peers, tmp_path, "solo-1")
    two = start_bare(bare_peers, tmp_path, "solo-2")
    await ready(one)
    await ready(two)
    async with MeshClient(one.url) as c:
        run = await c.submit("echo", {"x": 1})
        await wait_all_terminal(c, [run["id"]], timeout_s=30)
    secrets = []
    for peer in (one, two):
        secret_file = peer.data_dir / "cluster.secret"
        secret = secret_file.read_text().strip()
        assert len(secret) == 64 and secret != OLD_DEV_SECRET
        secrets.append(secret)
        assert mode(peer.data_dir) == 0o700
        files = modes(peer.data_dir)
        assert {"cluster.secret", "raft.journal", "raft.journal.meta", "voters.json"} <= set(files)
        assert set(files.values()) == {0o600}, files
        db_files = modes(tmp_path, f"{peer.db.name}*")
        assert peer.db.name in db_files and set(db_files.values()) == {0o600}, db_files
    assert secrets[0] != secrets[1]
    # A restart keeps the secret it made.
    one.process.terminate()
    assert one.process.wait(15) == 0
    bare_peers.remove(one)
    ports = (raft_addr(one.raft)[1], int(one.url.rpartition(":")[2]))
    again = start_bare(bare_peers, tmp_path, "solo-1", ports)
    await ready(again)
    assert (again.data_dir / "cluster.secret").read_text().strip() == secrets[0]


async def test_a_frame_under_the_old_constant_secret_runs_no_code(
    bare_peers: list[BarePeer], tmp_path: Path
) -> None:
    """The attack of the security review: a pickle encrypted with the former
    built-in secret, sent to a peer started without one. It used to run."""
    peer = start_bare(bare_peers, tmp_path, "target")
    await ready(peer)
    marker = tmp_path / "pwned"
    token = fernet_for(OLD_DEV_SECRET).encrypt_at_time(
        zlib.compress(pickle.dumps(MakeDir(str(marker)))), int(time.monotonic())
    )
    with socket.create_connection(raft_addr(peer.raft), timeout=5) as sock:
        sock.sendall(struct.pack("i", len(token)) + token)
        closed = closed_within(sock, 5)
    assert not marker.exists(), "the forged frame ran code in the peer"
    assert closed, "the forged frame was accepted"
    async with MeshClient(peer.url) as c:
        assert await c.readyz()
        run = await c.submit("echo", {"still": "serving"})
        done = await wait_all_terminal(c, [run["id"]], timeout_s=30)
        assert done[run["id"]]["status"] == "succeeded"
    assert "does not decrypt" in peer.log.read_text()


async def test_the_raft_port_bounds_what_strangers_can_make_it_hold(make_mesh) -> None:
    """A 2 GiB length announced before authenticating closes the connection at
    once; idle strangers are bounded in number and time; the leader keeps
    leading and the mesh keeps serving."""
    mesh = await make_mesh("sqlite", nodes=3)
    async with MeshClient(mesh.url("peer-1")) as c:
        leader = (await c.cluster())["leader"]
        term = (await c.cluster())["term"]
    target = raft_addr(mesh.peer(leader).raft)

    started = time.monotonic()
    with socket.create_connection(target, timeout=5) as sock:
        sock.sendall(struct.pack("i", 0x7FFFFFFF) + b"\0" * 65536)
        try:
            for _ in range(48 * 16):  # up to 48 MB, as in the review
                sock.sendall(b"\0" * 65536)
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert closed_within(sock, 3), "an oversize frame kept the connection open"
    assert time.monotonic() - started < 5

    idle = [socket.create_connection(target, timeout=5) for _ in range(40)]
    try:
        closed_early = [s for s in idle if closed_within(s, 0.05)]
        assert len(closed_early) >= 8, "more than 32 unauthenticated connections were kept"
        assert all(closed_within(s, 5) for s in idle), "idle strangers were kept forever"
    finally:
        for s in idle:
            s.close()

    async with MeshClient(mesh.url(leader)) as c:
        info = await c.cluster()
        assert (info["leader"], info["term"]) == (leader, term), "the leadership moved"
        run = await c.submit("echo", {"after": "attack"})
        done = await wait_all_terminal(c, [run["id"]], timeout_s=30)
        assert done[run["id"]]["status"] == "succeeded"
    log = mesh.peer(leader).log_path.read_text()
    assert "unauthenticated frame of 2147483647 bytes" in log
    # 9+ rejections, logged at most once per 10 s.
    assert log.count("raft port: closed the connection") <= 2


async def test_isolated_agents_do_not_inherit_the_peers_secrets(make_mesh, tmp_path: Path) -> None:
    token_file = tmp_path / "api.token"
    token_file.write_text("the-api-token\n")
    env = {
        "PYTHONPATH": str(E2E_DIR),
        "MESH_AGENT_MODULES": "probe_agents",
        "MESH_API_TOKEN_FILE": str(token_file),
        "MESH_API_TOKEN_EXTRA": "t",
        "MESH_CHAT_API_KEY": "sk-chat",
        "OPENAI_API_KEY": "sk-openai",
        "MESH_CHAT_MODEL": "local-model",
        "MESH_CHAT_BASE_URL": "http://127.0.0.1:9/v1",
    }
    mesh = await make_mesh("sqlite", nodes=1, env=env)
    async with MeshClient(mesh.url("peer-1"), "the-api-token") as c:
        isolated = (await c.submit("probe_env", {}, isolation="process"))["id"]
        in_process = (await c.submit("probe_env", {}))["id"]
        runs = await wait_all_terminal(c, [isolated, in_process], timeout_s=60)
    names = set(runs[isolated]["result"]["names"])
    assert runs[isolated]["result"]["pid"] != runs[in_process]["result"]["pid"]
    leaked = {n for n in names if "SECRET" in n or "TOKEN" in n or n.endswith("_API_KEY")}
    assert leaked == set(), leaked
    assert "MESH_STORAGE" not in names and "PYTHONPATH" in names and "PATH" in names
    assert "MESH_CHAT_MODEL" in names, "the isolation_env default passes the chat endpoint"
    assert "MESH_CHAT_API_KEY" in runs[in_process]["result"]["names"]


async def test_mesh_dev_keeps_the_storage_password_out_of_argv(tmp_path: Path) -> None:
    """Any user can read /proc/<pid>/cmdline; the password must not be there."""
    schema = f"e2e_{uuid.uuid4().hex[:16]}"
    password = f"pw-{uuid.uuid4().hex[:8]}"
    storage = PG_URL.replace("postgres@", f"postgres:{password}@", 1) + f"?schema={schema}"
    assert password in storage
    mesh = DevMesh(tmp_path / "mesh", 2, storage=storage, base_port=0)
    try:
        mesh.start()
        await mesh.wait_ready(timeout_s=60)
        for peer in mesh.peers:
            assert peer.process is not None
            argv = cmdline(peer.process.pid)
            assert b"raftmesh.cli" in argv
            assert password.encode() not in argv, argv
            assert not (peer.data_dir / "cluster.secret").exists()
        # Both peers read the one secret file of the mesh (0600).
        assert mode(mesh.secret_file) == 0o600
    finally:
        mesh.stop(grace_s=5)
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
