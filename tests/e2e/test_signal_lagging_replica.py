"""A signal to a run that a peer's replica does not know yet, but storage does.

Found by the chaos harness (invariant 8): a peer restarted after a kill,
still replaying the log, answered 409 ("it takes no more signals") for a run
that was waiting, because storage holds active runs as queued or running rows
too. A client takes 409 as final, so the run waited forever. Such a peer must
answer 503 (retry elsewhere or later) and keep 409 for runs that have ended.

The lagging replica is made here the direct way: the run's row is put in
storage without the run being submitted, which is what that peer saw.
"""

from __future__ import annotations

import uuid

import pytest

from raftmesh.consensus.spec import RunSpec
from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.runner.payload import pack
from raftmesh.storage.base import RunRow

pytestmark = pytest.mark.slow


async def test_a_replica_behind_storage_answers_503_not_409(make_mesh, open_mesh_store) -> None:
    mesh = await make_mesh("postgres", nodes=1)
    store = await open_mesh_store(mesh)
    run_id = uuid.uuid4().hex
    spec = RunSpec(agent="echo", input=pack({"x": 1}), tenant="default")
    await store.record_runs([RunRow(id=run_id, spec=spec, submitted_at_ms=1, status="running")])
    async with MeshClient(mesh.peers[0].url) as client:
        with pytest.raises(MeshHTTPError) as lagging:
            await client.signal(run_id, "s", 1, idempotency_key="k")
        assert lagging.value.status == 503, lagging.value
        await store.set_terminal(run_id, "cancelled", None, 2)
        with pytest.raises(MeshHTTPError) as ended:
            await client.signal(run_id, "s", 1, idempotency_key="k")
        assert ended.value.status == 409 and "cancelled" in str(ended.value), ended.value
