"""Live run events for watchers on any peer (Server-Sent Events).

Events are durable in storage before ``ctx.emit`` counts them as sent, so a
watcher never needs the owner: every peer reads the same rows. A follower
reads what is stored after the last sequence it sent, then waits for a wake-up:
PostgreSQL LISTEN/NOTIFY (every ``append_event`` notifies the run id) wakes
it at once, and a periodic re-read is the backstop for notifications lost
while a listening connection was down. SQLite has no notifications, so there
the re-read is all there is, on a shorter period.

Per-run sequence numbers are the SSE ids, so ``Last-Event-ID`` resumes exactly
after the last event the client saw: nothing missed, nothing twice. When the
run's outcome is stored the follower sends what remains and then one ``end``
event (without an id); the outcome is written only after every event of the
run, so nothing can follow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from raftmesh.consensus.status import TERMINAL_STATUSES
from raftmesh.runner.payload import event_data
from raftmesh.storage.base import StorageUnavailable, Store

log = logging.getLogger("raftmesh.events")

SQLITE_POLL_S = 0.2
PAGE = 500
# A comment line this often keeps proxies from cutting a quiet stream (a run
# may sleep for hours between events).
KEEPALIVE_S = 15.0


@dataclass(frozen=True)
class Frame:
    """One SSE message: ``id`` is None for the terminal ``end`` event; an empty
    ``event`` is a keep-alive comment."""

    event: str
    data: dict[str, Any]
    id: int | None = None


class EventHub:
    """Wakes the followers of a run when any peer appends one of its events."""

    def __init__(self, store: Store, poll_s: float) -> None:
        self._store = store
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._closed = False
        self._notifier = store.notifier()
        self.poll_s = poll_s if self._notifier is not None else min(poll_s, SQLITE_POLL_S)

    async def start(self) -> None:
        if self._notifier is not None:
            await self._notifier.listen(self._notify)

    def close(self) -> None:
        """End every stream (clients resume elsewhere with Last-Event-ID), so a
        stopping peer does not wait for watchers of long runs."""
        self._closed = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.set()

    def _notify(self, run_id: str) -> None:
        for waiter in self._waiters.get(run_id, ()):
            waiter.set()

    @contextlib.contextmanager
    def _subscribe(self, run_id: str) -> Iterator[asyncio.Event]:
        waiter = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[run_id]

    async def follow(self, run_id: str, after_seq: int) -> AsyncIterator[Frame]:
        """Every event of ``run_id`` after ``after_seq``, then ``end`` once the run ended."""
        last = after_seq
        quiet_since = asyncio.get_running_loop().time()
        with self._subscribe(run_id) as wake:
            while not self._closed:
                wake.clear()
                sent = last
                try:
                    # Status first: events stored before the outcome are all
                    # visible to the read that follows it.
                    row = await self._store.get_run(run_id)
                    ended = row is not None and row.status in TERMINAL_STATUSES
                    while True:
                        page = await self._store.read_events(run_id, after_seq=last, limit=PAGE)
                        for event in page:
                            last = event.seq
                            yield Frame(
                                event="event",
                                id=event.seq,
                                data={
                                    "seq": event.seq,
                                    "kind": event.kind,
                                    "data": event_data(event.data),
                                    "epoch": event.epoch,
                                    "at": event.at_ms / 1000,
                                },
                            )
                        if len(page) < PAGE:
                            break
                except StorageUnavailable as exc:
                    log.warning(
                        "event stream waiting for storage: %s", exc, extra={"run_id": run_id}
                    )
                else:
                    if ended:
                        assert row is not None
                        yield Frame(
                            event="end",
                            data={"status": row.status, "error": row.error, "last_seq": last},
                        )
                        return
                now = asyncio.get_running_loop().time()
                if last != sent:
                    quiet_since = now
                elif now - quiet_since >= KEEPALIVE_S:
                    quiet_since = now
                    yield Frame(event="", data={})
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await wake.wait()


def encode(frame: Frame) -> bytes:
    if not frame.event:
        return b": keep-alive\n\n"
    lines = []
    if frame.id is not None:
        lines.append(f"id: {frame.id}")
    lines.append(f"event: {frame.event}")
    lines.append(f"data: {json.dumps(frame.data, separators=(',', ':'))}")
    return ("\n".join(lines) + "\n\n").encode()
