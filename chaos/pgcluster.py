"""A private PostgreSQL server the harness may really restart.

The machine's shared PostgreSQL service is never stopped (other work uses
it); for the ``db`` fault's ``restart`` variant the harness starts its own
server with initdb/pg_ctl on a free port and data directory of its own, and
restarts that one (``immediate`` mode: a crash and recovery, as after a power
cut or an OOM kill). PostgreSQL refuses to run as root, so as root the
commands run as the ``postgres`` user through runuser; as anyone else they
run as that user and need no privileges at all.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path


class PgClusterError(RuntimeError):
    """The private server could not be created or controlled."""


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    raise PgClusterError("no PostgreSQL server binaries (initdb, pg_ctl) found")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivatePostgres:
    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.data = dir / "data"
        self.log = dir / "postgres.log"
        self.port = _free_port()
        self._bin = _bin_dir()
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout_s: float = 60) -> None:
        cmd = [str(self._bin / argv[0]), *argv[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise PgClusterError(f"{' '.join(argv[:2])} failed: {done.stderr.strip()[-500:]}")

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                "max_connections = 200\n"
            )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        pid_file = self.data / "postmaster.pid"
        return pid_file.exists()

    def destroy(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
