"""How long this peer's process stops: garbage-collector pauses and event-loop lag.

Every acknowledgement, heartbeat and claim waits behind both, so a latency
tail that the Raft and storage histograms do not explain shows here first.
Collector pauses stop the tick thread too (they hold the GIL).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque
from typing import Any

from prometheus_client import Histogram

# The loop is expected to wake this often; lateness beyond it is lag.
LAG_PROBE_S = 0.1


class Stalls:
    """Feeds ``gc_pause`` (by generation) and ``loop_lag`` while started."""

    def __init__(self, gc_pause: Histogram, loop_lag: Histogram) -> None:
        self._gc_pause = gc_pause
        self._loop_lag = loop_lag
        self._gc_started: float | None = None
        # Filled by the collector's callback, drained on the loop: observing a
        # histogram takes its lock, which the collector may have interrupted.
        self._gc_pauses: deque[tuple[int, float]] = deque(maxlen=10_000)
        self._probe: asyncio.Task[None] | None = None

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._probe = asyncio.create_task(self._probe_lag(), name="loop-lag")

    async def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collector, on whichever thread triggered it: a clock
        # read and an append, nothing that takes a lock.
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self._gc_pauses.append((info["generation"], time.perf_counter() - self._gc_started))
            self._gc_started = None

    async def _probe_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_PROBE_S
            await asyncio.sleep(LAG_PROBE_S)
            self._loop_lag.observe(max(0.0, loop.time() - due))
            while self._gc_pauses:
                generation, pause = self._gc_pauses.popleft()
                self._gc_pause.labels(str(generation)).observe(pause)
