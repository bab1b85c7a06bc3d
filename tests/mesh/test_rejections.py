"""Every refusal of the state machine has one HTTP answer, in one table."""

from __future__ import annotations

from raftmesh.consensus.results import Rejection
from raftmesh.mesh.errors import REJECTIONS, refusal


def test_every_rejection_maps_to_an_http_error() -> None:
    assert set(REJECTIONS) == set(Rejection)
    statuses = {reason: refusal(reason, "why").status for reason in Rejection}
    assert statuses[Rejection.TENANT_QUEUE_FULL] == 429
    assert statuses[Rejection.UNKNOWN_RUN] == statuses[Rejection.UNKNOWN_PEER] == 404
    assert statuses[Rejection.STALE_EPOCH] == statuses[Rejection.CONFLICT] == 409
    assert statuses[Rejection.MALFORMED] == statuses[Rejection.INVALID] == 400
    assert statuses[Rejection.INTERNAL] == 500
    assert refusal(Rejection.TENANT_QUEUE_FULL, "full", retry_after_s=3).retry_after_s == 3
