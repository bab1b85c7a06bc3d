"""Real meshes for end-to-end tests: peer processes, sockets, HTTP, databases.

``make_mesh`` builds a DevMesh on PostgreSQL (a fresh schema per mesh, dropped
afterwards) or on SQLite (a file in tmp_path), starts it, waits until every
peer is ready, and stops everything it built in reverse order.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from mesh.devmesh import DevMesh
from storage import Store, open_store

PG_URL = os.environ.get("RAFTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

MakeMesh = Callable[..., Awaitable[DevMesh]]


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_mesh(tmp_path: Path) -> AsyncIterator[MakeMesh]:
    meshes: list[DevMesh] = []
    schemas: list[str] = []

    async def make(backend: str = "postgres", nodes: int = 3, **kwargs: Any) -> DevMesh:
        n = len(meshes)
        if backend == "postgres":
            schema = f"e2e_{uuid.uuid4().hex[:16]}"
            schemas.append(schema)
            storage = f"{PG_URL}?schema={schema}"
        else:
            storage = f"sqlite:///{tmp_path / f'mesh{n}.db'}"
        env = {"MESH_LOG_LEVEL": "info", **kwargs.pop("env", {})}
        # Free ports from the kernel: the default ones may belong to a mesh of
        # another test run on this machine, whose peers would answer instead.
        kwargs.setdefault("base_port", 0)
        mesh = DevMesh(tmp_path / f"mesh{n}", nodes, storage=storage, env=env, **kwargs)
        meshes.append(mesh)
        mesh.start()
        await mesh.wait_ready(timeout_s=60)
        return mesh

    yield make
    for mesh in reversed(meshes):
        mesh.stop(grace_s=5)
    if schemas:
        conn = await asyncpg.connect(PG_URL)
        try:
            for schema in schemas:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def open_mesh_store() -> AsyncIterator[Callable[[DevMesh], Awaitable[Store]]]:
    """Read a mesh's storage directly, to check what peers really wrote."""
    stores: list[Store] = []

    async def make(mesh: DevMesh) -> Store:
        store = open_store(mesh.storage)
        await store.open()
        stores.append(store)
        return store

    yield make
    for store in reversed(stores):
        await store.close()
