"""The cluster secret and the peer's files on disk.

The Raft port speaks pickle behind pysyncobj's Fernet check (see
consensus/raft_port.py): whoever holds the cluster secret can run code in every
peer. So there is no built-in secret. A peer takes it from MESH_SECRET_FILE or
MESH_SECRET (the ``--secret`` flag still works, deprecated: argv shows in
``ps``); without one, and only when every address it binds, names or dials is
loopback, it uses ``cluster.secret`` in its data dir, created once with 32
random bytes. The other peers of ``mesh dev`` are pointed at one such file.

The data dir holds the Raft journal and snapshots (the whole replicated state)
and that secret: it is made 0700 and what is in it 0600, as are SQLite files.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from raftmesh.mesh.settings import Settings, read_secret_file

SECRET_FILE = "cluster.secret"
_SQLITE_PREFIX = "sqlite:///"


def create_secret_file(path: str | Path, secret: str | None = None) -> str:
    """Write a new secret (32 random bytes, hex, unless given) readable by the
    owner only, from the first byte on; an existing file is an error."""
    secret = secret or secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return secret


def local_secret_path(settings: Settings) -> str:
    return os.path.join(settings.data_dir, SECRET_FILE)


def cluster_secret(settings: Settings) -> tuple[str, str | None]:
    """The Raft secret, and the path of the data dir's own secret file when
    that is where it came from (None when it was configured)."""
    if settings.secret:
        return settings.secret, None
    settings.check_secret()
    path = local_secret_path(settings)
    try:
        return create_secret_file(path), path
    except FileExistsError:
        return read_secret_file(path, "the cluster secret"), path


def secure_data_dir(settings: Settings) -> None:
    """Make what this peer writes private to its user, whatever umask it inherited.

    The umask (0077) covers every file created from here on, by this process,
    by pysyncobj (journal, its ``.meta``, dumps and their temporary files) and
    by SQLite (database, ``-wal``, ``-shm``); the chmods fix files and dirs left
    by an earlier version.
    """
    os.umask(0o077)
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    for entry in data_dir.iterdir():
        if entry.is_file() and not entry.is_symlink():
            entry.chmod(0o600)
    if settings.storage.startswith(_SQLITE_PREFIX):
        db = settings.storage[len(_SQLITE_PREFIX) :].partition("?")[0]
        for path in (db, db + "-wal", db + "-shm", db + "-journal"):
            if os.path.isfile(path):
                os.chmod(path, 0o600)


__all__ = [
    "SECRET_FILE",
    "cluster_secret",
    "create_secret_file",
    "secure_data_dir",
]
