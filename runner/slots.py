"""This peer's running attempts, bounded by its slots.

The replicated state gives a peer at most its slots plus the mesh's prefetch;
this keeps the local side honest (at most ``capacity`` attempts, one task per
run and epoch) and lets the peer stop attempts the state no longer gives it.
An attempt's slot frees when its outcome is known, not when the log has it:
the report goes on beside the next attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from raftmesh.runner.attempt import Assignment, Outcome

log = logging.getLogger("raftmesh.runner")


class Slots:
    def __init__(
        self,
        capacity: int,
        execute: Callable[[Assignment, asyncio.Event], Awaitable[Outcome]],
        on_outcome: Callable[[Assignment, Outcome], Awaitable[None]],
        on_free: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_free()`` is called each time an attempt ends and frees its slot."""
        self.capacity = capacity
        self._execute = execute
        self._on_outcome = on_outcome
        self._on_free = on_free
        self._tasks: dict[str, tuple[int, asyncio.Task[None]]] = {}
        self._release: dict[str, asyncio.Event] = {}
        # Attempts that ended and whose outcome is on its way to the log.
        self._reports: dict[tuple[str, int], asyncio.Task[None]] = {}

    @property
    def busy(self) -> int:
        """Attempts running or still reporting: what shutdown waits for."""
        return len(self._tasks) + len(self._reports)

    def reporting(self) -> set[tuple[str, int]]:
        return set(self._reports)

    def holds(self, run_id: str, epoch: int) -> bool:
        held = self._tasks.get(run_id)
        return held is not None and held[0] == epoch

    def running(self) -> dict[str, int]:
        return {run_id: epoch for run_id, (epoch, _) in self._tasks.items()}

    def start(self, job: Assignment) -> bool:
        if job.run_id in self._tasks or len(self._tasks) >= self.capacity:
            return False
        release = asyncio.Event()
        task = asyncio.create_task(self._run(job, release), name=f"run:{job.run_id}:{job.epoch}")
        self._tasks[job.run_id] = (job.epoch, task)
        self._release[job.run_id] = release
        return True

    def release(self, run_id: str) -> None:
        """Ask the attempt to stop at its next step boundary (it then reports RELEASED)."""
        event = self._release.get(run_id)
        if event is not None:
            event.set()

    async def _run(self, job: Assignment, release: asyncio.Event) -> None:
        key = (job.run_id, job.epoch)
        try:
            outcome = await self._execute(job, release)
        except asyncio.CancelledError:
            self._vacate(job)
            raise
        except Exception:
            log.exception("attempt crashed", extra={"run_id": job.run_id, "epoch": job.epoch})
            self._vacate(job)
            self._on_free()
            return
        if not self._vacate(job):
            return  # stopped meanwhile: the run is no longer this attempt's to report
        task = asyncio.current_task()
        assert task is not None
        self._reports[key] = task
        self._on_free()
        try:
            await self._on_outcome(job, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "reporting an outcome failed", extra={"run_id": job.run_id, "epoch": job.epoch}
            )
        finally:
            self._reports.pop(key, None)

    def _vacate(self, job: Assignment) -> bool:
        """Free the slot ``job`` holds, if it still holds it."""
        held = self._tasks.get(job.run_id)
        if held is None or held[0] != job.epoch:
            return False
        del self._tasks[job.run_id]
        self._release.pop(job.run_id, None)
        return True

    def stop(self, run_id: str) -> None:
        self._release.pop(run_id, None)
        held = self._tasks.pop(run_id, None)
        if held is not None:
            held[1].cancel()

    async def stop_all(self) -> None:
        tasks = [task for _, task in self._tasks.values()] + list(self._reports.values())
        self._tasks.clear()
        self._release.clear()
        self._reports.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
