"""The store attempts write through, timed: how load looks from the owner's side.

The runner knows nothing of Prometheus (it sits below mesh/ in the layers),
so the peer hands it this wrapper instead of the store itself. Every call is
passed through unchanged; the writes an attempt makes are observed on the way.
"""

from __future__ import annotations

import time
from typing import Any

from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.tracing import Tracing
from raftmesh.storage.base import Claim, RunRow, Store

_MAX_TRACKED = 10_000


class TimedStore:
    def __init__(self, inner: Store, metrics: Metrics, tracing: Tracing) -> None:
        self._inner = inner
        self._metrics = metrics
        self._tracing = tracing
        # (run id, epoch) -> monotonic time of the last step boundary; one
        # entry per attempt running on this peer, dropped with its outcome.
        self._boundary: dict[tuple[str, int], float] = {}
        self._started_ms: dict[tuple[str, int], int | None] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def wrapped(self) -> Store:
        """The backend underneath, for tables of its own (LangGraph checkpoints)."""
        return self._inner

    async def claim(self, run: RunRow, epoch: int, peer: str, now_ms: int) -> Claim:
        with self._tracing.span("raftmesh.run.claim", {"run_id": run.id, "epoch": epoch}):
            claim = await self._inner.claim(run, epoch, peer, now_ms)
            self._tracing.annotate(attempt=claim.run.attempts, finished=claim.finished)
        if len(self._boundary) > _MAX_TRACKED:
            # Attempts that ended without an outcome here (fenced, released)
            # leave entries behind; forgetting them costs one step sample each.
            self._boundary.clear()
            self._started_ms.clear()
        key = (run.id, epoch)
        self._boundary[key] = time.monotonic()
        self._started_ms[key] = claim.run.started_at_ms
        if claim.run.attempts <= 1 and run.submitted_at_ms:
            self._metrics.assignment_latency.observe(max(0, now_ms - run.submitted_at_ms) / 1000)
        return claim

    async def put_step(
        self, run_id: str, epoch: int, seq: int, name: str, value: bytes, peer: str, now_ms: int
    ) -> None:
        started = time.monotonic()
        step = {"run_id": run_id, "epoch": epoch, "step_seq": seq, "step_name": name}
        with self._tracing.span("raftmesh.checkpoint.write", step):
            await self._inner.put_step(run_id, epoch, seq, name, value, peer, now_ms)
        done = time.monotonic()
        self._metrics.checkpoint_write.observe(done - started)
        boundary = self._boundary.get((run_id, epoch))
        if boundary is not None:
            self._metrics.step_duration.observe(started - boundary)
        self._boundary[(run_id, epoch)] = done

    async def put_result(
        self,
        run_id: str,
        epoch: int,
        status: str,
        result: bytes | None,
        error: str | None,
        now_ms: int,
    ) -> None:
        key = (run_id, epoch)
        outcome = {"run_id": run_id, "epoch": epoch, "status": status}
        try:
            with self._tracing.span("raftmesh.run.result", outcome):
                await self._inner.put_result(run_id, epoch, status, result, error, now_ms)
        finally:
            self._boundary.pop(key, None)
            started_ms = self._started_ms.pop(key, None)
        self._metrics.runs_finished.labels(status).inc()
        if started_ms:
            self._metrics.run_duration.observe(max(0, now_ms - started_ms) / 1000)
