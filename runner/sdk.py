"""What agent authors import."""

from runner.agents.chat import tool
from runner.context import (
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
)
from runner.registry import agent

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
    "agent",
    "tool",
]
