"""What agent authors import."""

from runner.context import Fenced, NonDeterminism, RunContext
from runner.registry import agent

__all__ = ["Fenced", "NonDeterminism", "RunContext", "agent"]
