"""What the replicated state holds: runs and peers, plain and snapshot-ready.

Separate from ``state`` so the eligibility rule (``eligibility``) can read
them without importing the state machine that applies it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from raftmesh.consensus.spec import SPEC_FIELDS, RunSpec
from raftmesh.consensus.status import RunStatus

PEER_UP = "up"
PEER_DOWN = "down"
# Reserved by a join, not announced by a process yet.
PEER_JOINING = "joining"
# Removed from the mesh for good; its id may join again.
PEER_LEFT = "left"

VOTER = "voter"
EXECUTOR = "executor"
ROLES = frozenset({VOTER, EXECUTOR})

# Drain modes: runs already there finish there, or are released at their next
# step boundary and run elsewhere.
DRAIN_FINISH = "finish"
DRAIN_RELEASE = "release"
DRAIN_MODES = frozenset({"", DRAIN_FINISH, DRAIN_RELEASE})


@dataclass
class Run:
    """An active run: what it was submitted as (``spec``, never changed), and
    where it stands (everything else, changed only by apply)."""

    id: str
    spec: RunSpec
    submitted_at_ms: int = 0
    status: RunStatus = RunStatus.QUEUED
    owner: str | None = None
    epoch: int = 0
    attempts: int = 0
    assigned_at_ms: int | None = None
    not_before_ms: int = 0
    errors: int = 0
    timeouts: int = 0
    losses: int = 0
    last_error: str | None = None
    cancel_requested: bool = False
    outcome: RunStatus | None = None
    # What a WAITING run waits for (consensus/waits.py says when it is over);
    # a PAUSED run keeps the wait it was paused in.
    waiting_for: dict[str, Any] | None = None
    # Per signal name: how many signals were announced (highest seq + 1).
    signals: dict[str, int] = field(default_factory=dict)
    # An operator paused the run while it ran: its owner releases it at the
    # next step boundary and the release parks it PAUSED.
    pause_requested: bool = False

    def __post_init__(self) -> None:
        # A snapshot carries plain text; equal either way, typed from here on.
        self.status = RunStatus(self.status)
        if self.outcome is not None:
            self.outcome = RunStatus(self.outcome)

    def public(self) -> dict[str, Any]:
        """Plain values, for snapshots."""
        values = {**self.__dict__, "spec": self.spec.to_wire(), "signals": dict(self.signals)}
        if self.waiting_for is not None:
            values["waiting_for"] = copy.deepcopy(self.waiting_for)
        return values

    @classmethod
    def from_public(cls, data: dict[str, Any]) -> Run:
        """A snapshot's run; snapshots before version 3 kept the spec's fields
        flat beside the others, before version 4 had no waits (the defaults)."""
        values = dict(data)
        if "spec" in values:
            spec = RunSpec(**values.pop("spec"))
        else:
            spec = RunSpec(**{k: values.pop(k) for k in SPEC_FIELDS if k in values})
        return cls(spec=spec, **values)


@dataclass
class Peer:
    id: str
    incarnation: str
    raft: str
    http: str
    slots: int
    labels: dict[str, str] = field(default_factory=dict)
    status: str = PEER_UP
    since_ms: int = 0
    agents: list[str] | None = None
    role: str = VOTER
    # Operator intent, kept across restarts of the peer: "" or a drain mode.
    drain: str = ""
    # This incarnation is shutting down (SIGTERM): it gets nothing new.
    stopping: bool = False

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def can_run(self, agent: str) -> bool:
        """Peers that announced no agent list (older peers) are assumed to run any."""
        return self.agents is None or agent in self.agents
