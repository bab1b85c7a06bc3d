"""A mesh of real peer processes on one machine: `mesh dev`, the demo and tests.

Peers run as separate processes (``python -m raftmesh.cli up``), not in-process, so
that kill -9, SIGSTOP and restarts exercise exactly what happens in
production. Each child gets its own session so that a Ctrl-C in the terminal
reaches only the controlling process, which then stops the peers in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.credentials import SECRET_FILE, create_secret_file

DEFAULT_BASE_PORT = 8001
HTTP_PORT_OFFSET = 100
# The mesh's own: a developer's MESH_SECRET would conflict with the secret file.
_SET_BY_DEVMESH = frozenset({"MESH_SECRET", "MESH_SECRET_FILE", "MESH_STORAGE"})


class DevMeshError(RuntimeError):
    """The local mesh could not be started or did not become ready."""


@dataclass
class DevPeer:
    id: str
    raft: str
    http: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    role: str = "voter"
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.http}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class DevMesh:
    """Peers ``peer-1..peer-N`` sharing one storage, each with a data dir and log in ``dir``.

    ``storage`` defaults to one SQLite file shared by all peers; tests pass a
    PostgreSQL URL (with ``?schema=...``) instead. ``env`` is added to every
    peer's environment, ``peer_env[id]`` to that peer's only. Ports are chosen
    when the mesh is built, so URLs are known before ``start()``: Raft from
    ``base_port`` (default 8001, or free ports if taken; 0: free ports), HTTP
    from ``base_port + 100``.

    Every peer reads the Raft secret from one file, ``dir/cluster.secret``
    (0600, made when the mesh is first built): Raft traffic is pickle, so even a local
    mesh must not accept frames from whoever can reach its ports. Secrets and
    the storage URL (which may hold a password) travel in the environment,
    never in argv, which ``ps`` shows to every user.
    """

    def __init__(
        self,
        dir: str | Path,
        nodes: int = 3,
        *,
        storage: str | None = None,
        base_port: int | None = None,
        slots: int | None = None,
        env: Mapping[str, str] | None = None,
        peer_env: Mapping[str, Mapping[str, str]] | None = None,
        host: str = "127.0.0.1",
        executors: int = 0,
    ) -> None:
        """With MESH_TLS_CERT in ``env`` the peers serve https, and this mesh's
        own clients check them against MESH_CA."""
        if not 1 <= nodes <= HTTP_PORT_OFFSET:
            raise DevMeshError(f"nodes must be between 1 and {HTTP_PORT_OFFSET}, got {nodes}")
        self.dir = Path(dir).resolve()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.storage = storage or f"sqlite:///{self.dir / 'mesh.db'}"
        self.slots = slots
        self.secret_file = self.dir / SECRET_FILE
        if not self.secret_file.exists():
            create_secret_file(self.secret_file)
        self._env = dict(env or {})
        self._peer_env = {k: dict(v) for k, v in (peer_env or {}).items()}
        self._peer_command: dict[str, tuple[str, ...]] = {}
        if not 0 <= executors < nodes:
            raise DevMeshError(
                f"executors must leave at least one voter, got {executors} of {nodes}"
            )
        self.host = host
        self.scheme = "https" if self._env.get("MESH_TLS_CERT") else "http"
        self.ca = self._env.get("MESH_CA") or None
        raft_ports, http_ports = _pick_ports(host, nodes, base_port)
        self.peers = [
            DevPeer(
                id=f"peer-{i + 1}",
                raft=f"{host}:{raft_ports[i]}",
                http=f"{host}:{http_ports[i]}",
                data_dir=self.dir / f"peer-{i + 1}",
                log_path=self.dir / f"peer-{i + 1}.log",
                role="executor" if i >= nodes - executors else "voter",
                scheme=self.scheme,
            )
            for i in range(nodes)
        ]

    def __enter__(self) -> DevMesh:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def peer(self, peer_id: str) -> DevPeer:
        for peer in self.peers:
            if peer.id == peer_id:
                return peer
        raise KeyError(f"no peer {peer_id!r} in this mesh")

    def url(self, peer_id: str) -> str:
        return self.peer(peer_id).url

    def set_peer_env(self, peer_id: str, env: Mapping[str, str]) -> None:
        """Extra environment for one peer (also one that will ``join`` later)
        from its next start on; ports are known only once the mesh is built,
        so settings that name other peers' addresses (e.g. MESH_DIAL) are
        added here."""
        self._peer_env.setdefault(peer_id, {}).update(env)

    def set_peer_command(self, peer_id: str, command: Sequence[str] | None) -> None:
        """Start one peer with another program (e.g. another release's
        ``python -m cli``) from its next start on; None: this interpreter's
        ``raftmesh.cli`` again. Upgrade tests mix releases this way."""
        if command is None:
            self._peer_command.pop(peer_id, None)
        else:
            self._peer_command[peer_id] = tuple(command)

    def start(self) -> None:
        running = [p.id for p in self.peers if p.running]
        if running:
            raise DevMeshError(f"already running: {', '.join(running)}")
        for peer in self.peers:
            self._spawn(peer)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every running peer, SIGKILL those still alive after ``grace_s``."""
        _terminate([p for p in self.peers if p.running], grace_s)

    def kill(self, peer_id: str, sig: int = signal.SIGKILL) -> None:
        """Signal one peer (SIGKILL by default; SIGSTOP/SIGCONT to pause it).

        After SIGKILL the process is reaped, so ``running`` is false and its
        ports are free for ``restart`` as soon as this returns.
        """
        peer = self.peer(peer_id)
        if not peer.running:
            raise DevMeshError(f"{peer_id} is not running")
        assert peer.process is not None
        peer.process.send_signal(sig)
        if sig == signal.SIGKILL:
            peer.process.wait()

    def restart(self, peer_id: str, grace_s: float = 10.0) -> None:
        """Start the peer again from its data dir, stopping it first if it runs."""
        peer = self.peer(peer_id)
        _terminate([peer] if peer.running else [], grace_s)
        self._spawn(peer)

    def join(self, seed_id: str, role: str = "voter", peer_id: str | None = None) -> DevPeer:
        """Start one more peer with ``mesh join`` through ``seed_id``'s API.

        The new peer is added to ``peers`` before it runs; whether the join
        succeeded shows in ``wait_ready`` (or in its log and exit status).
        """
        peer_id = peer_id or f"peer-{len(self.peers) + 1}"
        raft_port, http_port = _free_ports(self.host, 2)
        peer = DevPeer(
            id=peer_id,
            raft=f"{self.host}:{raft_port}",
            http=f"{self.host}:{http_port}",
            data_dir=self.dir / peer_id,
            log_path=self.dir / f"{peer_id}.log",
            role=role,
            scheme=self.scheme,
        )
        argv = ["join", self.url(seed_id), "--id", peer.id, "--http", peer.http]
        if role == "voter":
            argv += ["--raft", peer.raft]
        else:
            argv += ["--executor"]
        argv += self._common_args(peer)
        self.peers.append(peer)
        self._launch(peer, argv)
        return peer

    async def wait_ready(
        self, timeout_s: float = 60.0, peer_ids: Iterable[str] | None = None
    ) -> None:
        """Wait until /readyz answers 200 on the given peers (default: all).

        A peer whose process exits meanwhile fails the wait at once, with the
        end of its log, instead of after the whole timeout.
        """
        pending = [self.peer(i) for i in peer_ids] if peer_ids is not None else list(self.peers)
        deadline = time.monotonic() + timeout_s
        clients = {p.id: MeshClient(p.url, timeout_s=2, ca=self.ca) for p in pending}
        try:
            while pending:
                for peer in pending:
                    if not peer.running:
                        code = peer.process.returncode if peer.process else None
                        raise DevMeshError(
                            f"{peer.id} exited (code {code}) before it was ready; "
                            f"end of {peer.log_path}:\n{peer.log_tail()}"
                        )
                ready = await asyncio.gather(*(clients[p.id].readyz() for p in pending))
                pending = [p for p, ok in zip(pending, ready, strict=True) if not ok]
                if pending and time.monotonic() >= deadline:
                    names = ", ".join(p.id for p in pending)
                    raise DevMeshError(
                        f"not ready within {timeout_s:g} s: {names}; logs in {self.dir}"
                    )
                if pending:
                    await asyncio.sleep(0.2)
        finally:
            await asyncio.gather(*(c.close() for c in clients.values()))

    def _spawn(self, peer: DevPeer) -> None:
        argv = ["up", "--id", peer.id, "--raft", peer.raft, "--http", peer.http]
        # Voters name the other voters; an executor names the voters it follows.
        others = [p.raft for p in self.peers if p is not peer and p.role == "voter"]
        if others:
            argv += ["--peers", ",".join(others)]
        if peer.role != "voter":
            argv += ["--role", peer.role]
        self._launch(peer, argv + self._common_args(peer))

    def _common_args(self, peer: DevPeer) -> list[str]:
        argv = ["--data-dir", str(peer.data_dir)]
        if self.slots is not None:
            argv += ["--slots", str(self.slots)]
        return argv

    def _launch(self, peer: DevPeer, args: list[str]) -> None:
        peer.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        command = self._peer_command.get(peer.id, (sys.executable, "-m", "raftmesh.cli"))
        argv = [*command, *args]
        # A dev mesh is for trying things out: the demo agents come with it.
        env = {"MESH_DEMO_AGENTS": "true"}
        env.update({k: v for k, v in os.environ.items() if k not in _SET_BY_DEVMESH})
        env["PYTHONUNBUFFERED"] = "1"
        env.update({"MESH_SECRET_FILE": str(self.secret_file), "MESH_STORAGE": self.storage})
        # Last, so a test can give one peer another secret on purpose.
        env.update(self._env)
        env.update(self._peer_env.get(peer.id, {}))
        with open(peer.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {peer.id}\n".encode())
            log.flush()
            peer.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )


def _terminate(peers: list[DevPeer], grace_s: float) -> None:
    for peer in peers:
        assert peer.process is not None
        peer.process.send_signal(signal.SIGTERM)
        # A SIGSTOPped peer handles the SIGTERM only once it runs again.
        peer.process.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    for peer in peers:
        assert peer.process is not None
        try:
            peer.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            peer.process.kill()
            peer.process.wait()


def _pick_ports(host: str, nodes: int, base_port: int | None) -> tuple[list[int], list[int]]:
    """Raft ports base.., HTTP ports base+100..; any free ports if the defaults are taken.

    An explicit ``base_port`` is kept or refused, never silently replaced; 0
    asks for free ports outright, for tests that run meshes side by side.
    """
    if base_port == 0:
        free = _free_ports(host, 2 * nodes)
        return free[:nodes], free[nodes:]
    base = DEFAULT_BASE_PORT if base_port is None else base_port
    raft = list(range(base, base + nodes))
    http = [p + HTTP_PORT_OFFSET for p in raft]
    taken = [p for p in raft + http if not _port_free(host, p)]
    if not taken:
        return raft, http
    if base_port is not None:
        raise DevMeshError(f"ports in use on {host}: {', '.join(map(str, taken))}")
    free = _free_ports(host, 2 * nodes)
    return free[:nodes], free[nodes:]


def _port_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as the peers' own listeners use it: a port in TIME_WAIT
    # after a previous mesh is free for them, and so for us.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_ports(host: str, count: int) -> list[int]:
    """Ports the kernel hands out; all held open together so they are distinct."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
