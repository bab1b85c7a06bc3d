"""Real meshes for end-to-end tests: peer processes, sockets, HTTP, databases.

``make_mesh`` builds a DevMesh on PostgreSQL (a fresh schema per mesh, dropped
afterwards) or on SQLite (a file in tmp_path), starts it, waits until every
peer is ready, and stops everything it built in reverse order.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from chat_stub import ChatStub
from support import PG_URL, MakeMesh

from raftmesh.mesh.devmesh import DevMesh
from raftmesh.storage import Store, open_store


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class MeshFactory:
    """Builds meshes under ``root`` and closes them all, newest first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.meshes: list[DevMesh] = []
        self.schemas: list[str] = []

    async def make(
        self,
        backend: str = "postgres",
        nodes: int = 3,
        command: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> DevMesh:
        """``command``: what starts every peer instead of this interpreter's
        raftmesh.cli (another release's, for upgrade tests)."""
        n = len(self.meshes)
        if backend == "postgres":
            schema = f"e2e_{uuid.uuid4().hex[:16]}"
            self.schemas.append(schema)
            storage = f"{PG_URL}?schema={schema}"
        else:
            storage = f"sqlite:///{self.root / f'mesh{n}.db'}"
        env = {"MESH_LOG_LEVEL": "info", **kwargs.pop("env", {})}
        # Free ports from the kernel: the default ones may belong to a mesh of
        # another test run on this machine, whose peers would answer instead.
        kwargs.setdefault("base_port", 0)
        mesh = DevMesh(self.root / f"mesh{n}", nodes, storage=storage, env=env, **kwargs)
        for peer in mesh.peers if command is not None else []:
            mesh.set_peer_command(peer.id, command)
        self.meshes.append(mesh)
        mesh.start()
        await mesh.wait_ready(timeout_s=60)
        return mesh

    async def close(self) -> None:
        for mesh in reversed(self.meshes):
            mesh.stop(grace_s=5)
        if self.schemas:
            conn = await asyncpg.connect(PG_URL)
            try:
                for schema in self.schemas:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()


@pytest.fixture
async def make_mesh(tmp_path: Path) -> AsyncIterator[MakeMesh]:
    factory = MeshFactory(tmp_path)
    yield factory.make
    await factory.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def make_module_mesh(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[MakeMesh]:
    """Meshes shared by the tests of one module (which must then run on the
    module's event loop: ``pytest.mark.asyncio(loop_scope="module")``)."""
    factory = MeshFactory(tmp_path_factory.mktemp("meshes"))
    yield factory.make
    await factory.close()


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


@pytest.fixture
async def stub() -> AsyncIterator[ChatStub]:
    """An OpenAI-compatible model server on loopback that answers at once."""
    s = ChatStub(fail_first=0)
    await s.start()
    yield s
    await s.stop()
