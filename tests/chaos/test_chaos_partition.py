"""The proxies really partition Raft: a cut-off leader is replaced by the majority.

pysyncobj lets only one side of each pair dial, and identifies the dialler by
the address it announces; the harness keeps every peer's identity and only
redirects where it connects (MESH_DIAL), so cutting links in the proxy must
cut Raft itself. Shown here on a 3-peer mesh on PostgreSQL: isolate the
leader, the other two elect a new one and keep committing; the isolated one
cannot commit; heal, and all three agree again.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from raftmesh.chaos.harness import MeshControl, proxied_mesh
from raftmesh.chaos.proxy import DROPPED, UP
from raftmesh.mesh.client import MeshClient, MeshHTTPError

pytestmark = pytest.mark.slow

PG_URL = os.environ.get("RAFTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def leader_seen_by(client: MeshClient) -> str | None:
    try:
        return (await client.cluster()).get("leader")
    except (MeshHTTPError, OSError, TimeoutError):
        return None


async def wait_for(check, timeout_s: float, what: str):
    import asyncio

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def test_isolating_the_leader_through_the_proxies_elects_another(tmp_path: Path) -> None:
    schema = f"chaos_part_{uuid.uuid4().hex[:8]}"
    mesh, proxies = await proxied_mesh(
        tmp_path, 3, f"{PG_URL}?schema={schema}", 2, {"MESH_LOG_LEVEL": "info"}
    )
    control = MeshControl(mesh, proxies)
    clients = {p.id: MeshClient(p.url, timeout_s=8) for p in mesh.peers}
    try:
        mesh.start()
        await mesh.wait_ready(timeout_s=90)
        old = await wait_for(lambda: leader_seen_by(clients["peer-1"]), 20, "a leader")
        rest = [p for p in control.peer_ids if p != old]
        for other in rest:
            control.cut(old, other, DROPPED)
            control.cut(other, old, DROPPED)

        async def new_leader() -> str | None:
            seen = {await leader_seen_by(clients[p]) for p in rest}
            return seen.pop() if len(seen) == 1 and None not in seen and old not in seen else None

        started = time.monotonic()
        new = await wait_for(new_leader, 30, "the majority to elect another leader")
        elected_s = time.monotonic() - started
        accepted = await clients[rest[0]].submit("echo", {"side": "majority"})
        assert accepted["status"] == "queued"
        with pytest.raises(MeshHTTPError) as refused:
            await clients[old].submit("echo", {"side": "minority"})
        assert refused.value.status == 503

        for other in rest:
            control.cut(old, other, UP)
            control.cut(other, old, UP)

        async def all_agree() -> bool:
            seen = {await leader_seen_by(c) for c in clients.values()}
            return seen == {new}

        await wait_for(all_agree, 30, "all three peers to follow the new leader")
        print(f"majority elected {new} {elected_s:.2f} s after {old} was cut off")
    finally:
        for c in clients.values():
            await c.close()
        await control.close()
        mesh.stop(grace_s=5)
        await proxies.close()
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
