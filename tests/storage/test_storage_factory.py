"""open_store picks the backend from the URL without connecting."""

from __future__ import annotations

import pytest

from raftmesh.storage import open_store
from raftmesh.storage.postgres import PostgresStore
from raftmesh.storage.sqlite import SqliteStore


@pytest.mark.parametrize(
    "url",
    ["postgresql://postgres@127.0.0.1:5432/test", "postgres://u@h/db?schema=t_1&sslmode=disable"],
)
def test_postgres_urls(url: str) -> None:
    assert isinstance(open_store(url), PostgresStore)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:////var/lib/raftmesh/mesh.db", "/var/lib/raftmesh/mesh.db"),
        ("sqlite:///relative.db", "relative.db"),
        ("sqlite:///data/mesh.db", "data/mesh.db"),
    ],
)
def test_sqlite_urls(url: str, path: str) -> None:
    store = open_store(url)

    assert isinstance(store, SqliteStore)
    assert store.path == path


@pytest.mark.parametrize(
    "url", ["mysql://h/db", "/tmp/mesh.db", "sqlite:///", "sqlite://host/x.db"]
)
def test_unknown_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite:///relative.db"):
        open_store(url)
