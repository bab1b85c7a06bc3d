"""What the integrations' built-in agents accept, checked at submission.

Apart from the integrations themselves, so that a peer checks an input
without importing LangGraph or the Agents SDK (seconds and ~100 MB).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raftmesh.runner.agents.chat import ChatConfigError, choose_endpoint
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.registry import InvalidInput


def check_graph_input(input: Any, models: Mapping[str, ModelEndpoint]) -> None:
    """``{"graph": "module:attr", "input": ..., "config"?: {...}, "model"?: NAME}``."""
    if not isinstance(input, Mapping):
        raise InvalidInput('langgraph input must be {"graph": "module:attr", "input": ...}')
    unknown = set(input) - {"graph", "input", "config", "model"}
    if unknown:
        raise InvalidInput(f"langgraph input has unknown keys {sorted(unknown)}")
    module, _, attr = str(input.get("graph", "")).partition(":")
    if not isinstance(input.get("graph"), str) or not module or not attr:
        raise InvalidInput('langgraph input needs "graph": "module:attr" naming a compiled graph')
    if "input" not in input:
        raise InvalidInput('langgraph input needs "input", the graph\'s input')
    if not isinstance(input.get("config", {}), Mapping):
        raise InvalidInput('langgraph "config" must be an object (a RunnableConfig)')
    if "model" in input and input["model"] not in models:
        choices = ", ".join(sorted(models)) or "none"
        raise InvalidInput(f"unknown model {input['model']!r}; configured models: {choices}")


def check_agent_input(input: Any, models: Mapping[str, ModelEndpoint]) -> None:
    """``{"agent": "module:attr", "input": str, "model"?: NAME}``."""
    if not isinstance(input, Mapping):
        raise InvalidInput('openai_agent input must be {"agent": "module:attr", "input": "..."}')
    unknown = set(input) - {"agent", "input", "model"}
    if unknown:
        raise InvalidInput(f"openai_agent input has unknown keys {sorted(unknown)}")
    module, _, attr = str(input.get("agent", "")).partition(":")
    if not isinstance(input.get("agent"), str) or not module or not attr:
        raise InvalidInput('openai_agent input needs "agent": "module:attr" naming an agents.Agent')
    if not isinstance(input.get("input"), str):
        raise InvalidInput('openai_agent input needs "input", the text to send the agent')
    try:
        choose_endpoint(dict(input), models)
    except ChatConfigError as exc:
        raise InvalidInput(str(exc)) from None


CHECKS = {"langgraph": check_graph_input, "openai_agent": check_agent_input}
