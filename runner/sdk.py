"""What agent authors import."""

from raftmesh.runner.agents.chat import tool
from raftmesh.runner.context import (
    BudgetExhausted,
    ChildFailed,
    ChildRun,
    DepthLimit,
    FanOutLimit,
    Fenced,
    LimitExceeded,
    NonDeterminism,
    RunContext,
    RunError,
    SignalTimeout,
)
from raftmesh.runner.registry import agent

__all__ = [
    "BudgetExhausted",
    "ChildFailed",
    "ChildRun",
    "DepthLimit",
    "FanOutLimit",
    "Fenced",
    "LimitExceeded",
    "NonDeterminism",
    "RunContext",
    "RunError",
    "SignalTimeout",
    "agent",
    "tool",
]
