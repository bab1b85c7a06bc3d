"""Errors the API can answer with, and their one mapping to HTTP."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from raftmesh.consensus.results import Rejection
from raftmesh.storage.base import StorageUnavailable

T = TypeVar("T")


class MeshError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class BadRequest(MeshError):
    status = 400
    code = "bad_request"


class MalformedJSON(BadRequest):
    code = "malformed_json"


class UnknownAgentError(BadRequest):
    code = "unknown_agent"


class Unauthorized(MeshError):
    status = 401
    code = "unauthorized"


class Forbidden(MeshError):
    """A known token asked for what its scope does not cover (another
    tenant's submission, an admin route)."""

    status = 403
    code = "forbidden"


class RunNotFound(MeshError):
    status = 404
    code = "run_not_found"


class ScheduleNotFound(MeshError):
    status = 404
    code = "schedule_not_found"


class PeerNotFound(MeshError):
    status = 404
    code = "peer_not_found"


class PayloadTooLarge(MeshError):
    status = 413
    code = "payload_too_large"


class Conflict(MeshError):
    """The run or the membership is not in a state that allows the request
    (cancel a finished run, join with an id in use, lose the voters' majority)."""

    status = 409
    code = "conflict"


class TooManyRequests(MeshError):
    """Backpressure: the tenant's queue is at its maximum; retry after a while."""

    status = 429
    code = "tenant_queue_full"


class TooManyStreams(TooManyRequests):
    """Event streams are held open for hours: each peer and each token may
    hold only so many at once."""

    code = "too_many_streams"


class NotLeader(MeshError):
    """An internal call reached a peer that does not lead; the caller re-resolves."""

    status = 421
    code = "not_leader"


class Unavailable(MeshError):
    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: int | None = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class NoQuorumError(Unavailable):
    code = "no_quorum"


class StorageDown(Unavailable):
    code = "storage_unavailable"


async def from_storage(op: Awaitable[T]) -> T:
    """Await a storage call; an unreachable database becomes a 503 the caller can retry."""
    try:
        return await op
    except StorageUnavailable as exc:
        raise StorageDown(f"storage is unreachable: {exc}") from exc


# What each refusal of the state machine is to a client: the one table.
REJECTIONS: dict[Rejection, type[MeshError]] = {
    Rejection.MALFORMED: BadRequest,
    Rejection.INVALID: BadRequest,
    Rejection.UNKNOWN_RUN: RunNotFound,
    Rejection.UNKNOWN_PEER: PeerNotFound,
    Rejection.STALE_EPOCH: Conflict,
    Rejection.CONFLICT: Conflict,
    Rejection.TENANT_QUEUE_FULL: TooManyRequests,
    Rejection.INTERNAL: MeshError,
    Rejection.UNKNOWN_SCHEDULE: ScheduleNotFound,
}


def refusal(reason: Rejection, message: str, *, retry_after_s: int | None = None) -> MeshError:
    """The error to answer a refused command with (``message`` already says
    what was refused and why)."""
    return REJECTIONS[reason](message, retry_after_s=retry_after_s)
