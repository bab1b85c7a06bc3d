"""Replicated commands and their wire form.

A command is a plain dict so it round-trips through msgpack unchanged; this
module owns its shape. Every command carries ``cid`` (a proposer-made id, so a
retry after an ambiguous Raft outcome is applied once) and ``at_ms`` (the
proposer's clock: the state machine never reads one).

Many commands travel in one Raft log entry (group commit): an entry is a
msgpack-encoded list of commands with a format version in front.
"""

from __future__ import annotations

from typing import Any

import msgpack

from raftmesh.consensus.errors import ConsensusError

ENTRY_VERSION = 1

SUBMIT = "submit"
ASSIGN = "assign"
FINISH = "finish"
RELEASE = "release"
PEER_UP = "peer_up"
PEER_DOWN = "peer_down"
CONFIGURE = "configure"
FAIL = "fail"
CANCEL = "cancel"
SETTLE = "settle"
PEER_JOIN = "peer_join"
PEER_DRAIN = "peer_drain"
PEER_STOPPING = "peer_stopping"
PEER_LEAVE = "peer_leave"

OPS = frozenset(
    {
        SUBMIT,
        ASSIGN,
        FINISH,
        RELEASE,
        PEER_UP,
        PEER_DOWN,
        CONFIGURE,
        FAIL,
        CANCEL,
        SETTLE,
        PEER_JOIN,
        PEER_DRAIN,
        PEER_STOPPING,
        PEER_LEAVE,
    }
)

Command = dict[str, Any]


class CommandDecodeError(ConsensusError, ValueError):
    """A log entry that is not a version-1 list of commands."""


class CommandEncodeError(ConsensusError, ValueError):
    """A command holds a value msgpack cannot carry (an int wider than 64 bits,
    an object): refused before it reaches the log."""


def encode_entry(commands: list[Command]) -> bytes:
    try:
        return msgpack.packb([ENTRY_VERSION, commands], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CommandEncodeError(f"a command cannot be encoded: {exc}") from exc


def decode_entry(payload: bytes) -> list[Command]:
    try:
        version, commands = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CommandDecodeError(f"undecodable log entry: {exc}") from exc
    if version != ENTRY_VERSION or not isinstance(commands, list):
        raise CommandDecodeError(f"unsupported log entry version {version!r}")
    return commands


def submit(cid: str, at_ms: int, runs: list[dict[str, Any]]) -> Command:
    """``runs``: each with id, agent, input, tenant, priority, labels, timeout_s,
    max_attempts, idempotency_key, parent_id, session, placement; a dead letter
    re-queued by the API also carries the epoch and attempts storage knows."""
    return {"op": SUBMIT, "cid": cid, "at_ms": at_ms, "runs": runs}


def assign(cid: str, at_ms: int, term: int, batch: list[tuple[str, str, int]]) -> Command:
    """``batch``: (run id, peer id, epoch) triples chosen by the leader of ``term``."""
    return {
        "op": ASSIGN,
        "cid": cid,
        "at_ms": at_ms,
        "term": term,
        "batch": [list(item) for item in batch],
    }


def finish(
    cid: str, at_ms: int, run_id: str, epoch: int, status: str, error: str | None
) -> Command:
    return {
        "op": FINISH,
        "cid": cid,
        "at_ms": at_ms,
        "run": run_id,
        "epoch": epoch,
        "status": status,
        "error": error,
    }


def release(cid: str, at_ms: int, run_id: str, epoch: int) -> Command:
    return {"op": RELEASE, "cid": cid, "at_ms": at_ms, "run": run_id, "epoch": epoch}


def peer_up(
    cid: str,
    at_ms: int,
    peer_id: str,
    incarnation: str,
    raft: str,
    http: str,
    slots: int,
    labels: dict[str, str],
    agents: list[str] | None = None,
    role: str = "voter",
) -> Command:
    """``incarnation`` changes on every process start, so the state machine can
    tell a restarted peer (whose in-memory runs are gone) from a live one."""
    return {
        "op": PEER_UP,
        "cid": cid,
        "at_ms": at_ms,
        "peer": peer_id,
        "incarnation": incarnation,
        "raft": raft,
        "http": http,
        "slots": slots,
        "labels": labels,
        "agents": agents,
        "role": role,
    }


def peer_down(cid: str, at_ms: int, peer_id: str, incarnation: str) -> Command:
    """Names the incarnation judged dead, so a late verdict cannot take down the
    same peer's next incarnation."""
    return {
        "op": PEER_DOWN,
        "cid": cid,
        "at_ms": at_ms,
        "peer": peer_id,
        "incarnation": incarnation,
    }


def configure(
    cid: str,
    at_ms: int,
    tenant_caps: dict[str, int],
    default_tenant_cap: int | None,
    tenant_max_queued: dict[str, int] | None = None,
    default_tenant_max_queued: int | None = None,
    retry: dict[str, Any] | None = None,
) -> Command:
    """``retry``: backoff_base_ms, backoff_max_ms, retry_timeouts, count_lost_owner."""
    return {
        "op": CONFIGURE,
        "cid": cid,
        "at_ms": at_ms,
        "tenant_caps": tenant_caps,
        "default_tenant_cap": default_tenant_cap,
        "tenant_max_queued": tenant_max_queued or {},
        "default_tenant_max_queued": default_tenant_max_queued,
        "retry": retry or {},
    }


def fail(cid: str, at_ms: int, run_id: str, epoch: int, kind: str, error: str | None) -> Command:
    """The owner's attempt failed (``kind``: "error" or "timeout"); the state
    machine decides between a retry after backoff and a terminal outcome."""
    return {
        "op": FAIL,
        "cid": cid,
        "at_ms": at_ms,
        "run": run_id,
        "epoch": epoch,
        "kind": kind,
        "error": error,
    }


def cancel(cid: str, at_ms: int, run_id: str) -> Command:
    """Cancel an active run and every active run descending from it."""
    return {"op": CANCEL, "cid": cid, "at_ms": at_ms, "run": run_id}


def settle(cid: str, at_ms: int, run_id: str) -> Command:
    """Proposed once storage holds a settling run's outcome; evicts the run."""
    return {"op": SETTLE, "cid": cid, "at_ms": at_ms, "run": run_id}


def peer_join(cid: str, at_ms: int, peer_id: str, raft: str, http: str, role: str) -> Command:
    """Reserves ``peer_id`` for a process about to join (``raft`` is empty for
    an executor, which has no Raft listener)."""
    return {
        "op": PEER_JOIN,
        "cid": cid,
        "at_ms": at_ms,
        "peer": peer_id,
        "raft": raft,
        "http": http,
        "role": role,
    }


def peer_drain(cid: str, at_ms: int, peer_id: str, mode: str) -> Command:
    """``mode``: "finish", "release", or "" to undrain."""
    return {"op": PEER_DRAIN, "cid": cid, "at_ms": at_ms, "peer": peer_id, "mode": mode}


def peer_stopping(cid: str, at_ms: int, peer_id: str, incarnation: str) -> Command:
    return {
        "op": PEER_STOPPING,
        "cid": cid,
        "at_ms": at_ms,
        "peer": peer_id,
        "incarnation": incarnation,
    }


def peer_leave(cid: str, at_ms: int, peer_id: str) -> Command:
    return {"op": PEER_LEAVE, "cid": cid, "at_ms": at_ms, "peer": peer_id}
