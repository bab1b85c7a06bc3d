"""What the replicated state holds: runs and peers, plain and snapshot-ready.

Separate from ``state`` so the eligibility rule (``eligibility``) can read
them without importing the state machine that applies it.
"""

from __future__ import annotations

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
    id: str
    agent: str
    input: Any
    tenant: str = "default"
    priority: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    max_attempts: int = 1
    idempotency_key: str | None = None
    parent_id: str | None = None
    submitted_at_ms: int = 0
    depth: int = 0
    budget: dict[str, int] | None = None
    isolation: str = "task"
    memory_limit_mb: int | None = None
    status: RunStatus = RunStatus.QUEUED
    owner: str | None = None
    epoch: int = 0
    attempts: int = 0
    assigned_at_ms: int | None = None
    session: str | None = None
    placement: str | None = None
    not_before_ms: int = 0
    errors: int = 0
    timeouts: int = 0
    losses: int = 0
    last_error: str | None = None
    cancel_requested: bool = False
    outcome: RunStatus | None = None

    def __post_init__(self) -> None:
        # A snapshot carries plain text; equal either way, typed from here on.
        self.status = RunStatus(self.status)
        if self.outcome is not None:
            self.outcome = RunStatus(self.outcome)

    def spec(self) -> RunSpec:
        """What the run was submitted as (every field a retry needs)."""
        return RunSpec(**{name: getattr(self, name) for name in SPEC_FIELDS})

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
