"""Storage outages are waited out, not charged to a run as a failure.

A database restart of a few seconds must not fail every attempt that happens to
be writing a checkpoint. Retrying is safe because every write is fenced by
epoch (a superseded attempt gets StaleEpoch, not a second write) and each
caller makes its write idempotent or checks for it before writing again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from raftmesh.storage import StorageUnavailable

log = logging.getLogger("raftmesh.runner")

T = TypeVar("T")


async def retry_unavailable(
    op: Callable[[], Awaitable[T]], what: str, max_delay_s: float = 2.0
) -> T:
    delay = 0.05
    while True:
        try:
            return await op()
        except StorageUnavailable as exc:
            log.warning("storage unavailable during %s, retrying in %.2fs: %s", what, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
