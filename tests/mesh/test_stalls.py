"""The stall metrics see what they name: a collection the collector really
ran, and a loop held by blocking code, on real histograms."""

from __future__ import annotations

import asyncio
import gc
import time

from prometheus_client import CollectorRegistry, Histogram

from raftmesh.mesh.stalls import LAG_PROBE_S, Stalls


def _histograms() -> tuple[CollectorRegistry, Histogram, Histogram]:
    registry = CollectorRegistry()
    pause = Histogram("gc_pause", "", ["generation"], registry=registry)
    lag = Histogram("loop_lag", "", buckets=(0.05, 0.2, 1), registry=registry)
    return registry, pause, lag


async def test_a_collection_and_a_blocked_loop_are_observed() -> None:
    registry, pause, lag = _histograms()
    stalls = Stalls(pause, lag)
    stalls.start()
    try:
        await asyncio.sleep(LAG_PROBE_S / 2)  # the probe is asleep, due soon
        gc.collect(2)
        time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point: the probe wakes 0.3 s late
        await asyncio.sleep(3 * LAG_PROBE_S)
    finally:
        await stalls.stop()
    assert (registry.get_sample_value("gc_pause_count", {"generation": "2"}) or 0) >= 1
    late = registry.get_sample_value("loop_lag_count") or 0
    on_time = registry.get_sample_value("loop_lag_bucket", {"le": "0.2"}) or 0
    assert late >= 2
    assert late - on_time >= 1, "the 0.3 s block was not seen"


async def test_stop_removes_the_collector_callback() -> None:
    _, pause, lag = _histograms()
    stalls = Stalls(pause, lag)
    before = len(gc.callbacks)
    stalls.start()
    assert len(gc.callbacks) == before + 1
    await stalls.stop()
    assert len(gc.callbacks) == before
