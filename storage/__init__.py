"""Checkpoint, event and result storage with fenced writes (DESIGN.md, Fencing).

``open_store(url)`` picks the backend from the URL; callers then ``await
store.open()`` and talk to the ``Store`` protocol only.
"""

from __future__ import annotations

from raftmesh.storage.base import (
    AlreadyFinished,
    Claim,
    Event,
    RunRow,
    SignalRow,
    SignalStored,
    StaleEpoch,
    Step,
    StorageError,
    StorageUnavailable,
    Store,
)

__all__ = [
    "AlreadyFinished",
    "Claim",
    "Event",
    "RunRow",
    "SignalRow",
    "SignalStored",
    "StaleEpoch",
    "Step",
    "StorageError",
    "StorageUnavailable",
    "Store",
    "open_store",
]

_SQLITE_PREFIX = "sqlite:///"


def open_store(url: str, *, unsafe_disable_fencing: bool = False) -> Store:
    """Build the store a URL names; it still has to be opened.

    - ``postgresql://user@host:port/db?schema=NAME`` (or ``postgres://``):
      PostgresStore; ``schema`` is optional.
    - ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``:
      SqliteStore. As in SQLAlchemy, the path is everything after the third
      slash, so ``f"sqlite:///{path}"`` works for relative and absolute paths.

    Backends are imported here, lazily, so using one never imports the other's driver.
    ``unsafe_disable_fencing`` lets stale epochs write (see storage._common.fence):
    it exists only so the chaos checker can be shown catching stale writes.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        from raftmesh.storage.postgres import PostgresStore

        return PostgresStore(url, fencing=not unsafe_disable_fencing)
    if scheme == "sqlite":
        path = url[len(_SQLITE_PREFIX) :] if url.startswith(_SQLITE_PREFIX) else ""
        if not path:
            raise ValueError(
                f"SQLite URL {url!r} has no path: use sqlite:///relative.db or sqlite:////abs/path.db"
            )
        from raftmesh.storage.sqlite import SqliteStore

        return SqliteStore(path, fencing=not unsafe_disable_fencing)
    raise ValueError(
        f"unsupported storage URL {url!r}: expected postgresql://user@host:port/db[?schema=NAME],"
        " sqlite:///relative.db or sqlite:////absolute/path.db"
    )
