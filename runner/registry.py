"""Which agents this peer can run, by name.

Agents register with ``@agent("name")`` when their module is imported; built-ins
are imported by ``default_registry()``, others come from ``module`` or
``module:function`` references in the peer's settings.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any

AgentFn = Callable[..., Awaitable[Any]]


class UnknownAgent(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown agent {name!r}; this mesh runs: {', '.join(known) or 'none'}")
        self.name = name


class Registry:
    def __init__(self) -> None:
        self._agents: dict[str, AgentFn] = {}

    def add(self, name: str, fn: AgentFn) -> None:
        existing = self._agents.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"agent {name!r} is registered twice")
        self._agents[name] = fn

    def get(self, name: str) -> AgentFn:
        try:
            return self._agents[name]
        except KeyError:
            raise UnknownAgent(name, self.names()) from None

    def __contains__(self, name: object) -> bool:
        return name in self._agents

    def names(self) -> list[str]:
        return sorted(self._agents)

    def load(self, reference: str) -> None:
        """Import ``module`` (whose @agent decorators register themselves) or
        ``module:function`` (registered under its @agent name or its own name)."""
        module_name, _, attr = reference.partition(":")
        module = importlib.import_module(module_name)
        if attr:
            fn = getattr(module, attr)
            self.add(getattr(fn, "agent_name", attr), fn)


REGISTRY = Registry()


def agent(name: str) -> Callable[[AgentFn], AgentFn]:
    """Register an async function ``fn(ctx, input)`` as agent ``name``."""

    def register(fn: AgentFn) -> AgentFn:
        fn.agent_name = name  # type: ignore[attr-defined]
        REGISTRY.add(name, fn)
        return fn

    return register


def default_registry(references: tuple[str, ...] = ()) -> Registry:
    importlib.import_module("runner.agents.builtin")
    for ref in references:
        REGISTRY.load(ref)
    return REGISTRY
