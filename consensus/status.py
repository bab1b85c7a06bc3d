"""Run statuses: the one definition every layer imports.

A ``StrEnum`` so a status compares equal to its string: storage rows, JSON
bodies and msgpack snapshots keep carrying plain text.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    # No owner, no slot: waiting for what ``Run.waiting_for`` says, or paused
    # by an operator; each goes back to ``queued`` when its wait ends.
    WAITING = "waiting"
    PAUSED = "paused"
    # A terminal outcome decided by the mesh (cancelled while queued, retries
    # exhausted, owner lost too often): the run waits here until the leader has
    # written the outcome to storage and proposed ``settle``, so it is never
    # dropped from Raft before storage knows how it ended.
    SETTLING = "settling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


TERMINAL_STATUSES = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT}
)
# Terminal outcomes an operator may re-queue (POST /v1/runs/{id}/retry).
DEAD_LETTER_STATUSES = frozenset({RunStatus.FAILED, RunStatus.TIMED_OUT})
# In the replicated state and not ending (SETTLING stays internal).
ACTIVE_STATUSES = frozenset(
    {RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING, RunStatus.PAUSED}
)
