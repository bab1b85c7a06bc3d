"""Which agents this peer can run, by name.

Agents register with ``@agent("name")`` when their module is imported; built-ins
are imported by ``default_registry()``, others come from ``module`` or
``module:function`` references in the peer's settings and from installed
distributions that declare entry points in the ``raftmesh.agents`` group
(``name = "module:function"``).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from raftmesh.runner.models import ModelEndpoint

AgentFn = Callable[..., Awaitable[Any]]
# Refuses (InvalidInput) an input its agent would refuse anyway, at submission.
InputCheck = Callable[[Any, Mapping[str, ModelEndpoint]], None]

ENTRY_POINT_GROUP = "raftmesh.agents"


class UnknownAgent(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown agent {name!r}; this mesh runs: {', '.join(known) or 'none'}")
        self.name = name


class InvalidInput(ValueError):
    """The agent can never run this input on this mesh."""


class Registry:
    def __init__(self) -> None:
        self._agents: dict[str, AgentFn] = {}
        self.references: list[str] = []

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

    def check_input(self, name: str, input: Any, models: Mapping[str, ModelEndpoint]) -> None:
        """Run the agent's own input check, if it declares one, so a submission
        that could only fail is refused before it is queued."""
        check: InputCheck | None = getattr(self._agents.get(name), "input_check", None)
        if check is not None:
            check(input, models)

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
        if reference not in self.references:
            self.references.append(reference)

    def load_entry_points(self) -> None:
        """Agents of installed distributions: entry point ``name = "module:function"``
        registers the function under the entry point's name."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self.add(ep.name, ep.load())


REGISTRY = Registry()


def agent(name: str, check: InputCheck | None = None) -> Callable[[AgentFn], AgentFn]:
    """Register an async function ``fn(ctx, input)`` as agent ``name``;
    ``check(input, models)`` raises InvalidInput for inputs it can never run."""

    def register(fn: AgentFn) -> AgentFn:
        fn.agent_name = name  # type: ignore[attr-defined]
        if check is not None:
            fn.input_check = check  # type: ignore[attr-defined]
        REGISTRY.add(name, fn)
        return fn

    return register


def default_registry(references: tuple[str, ...] = ()) -> Registry:
    importlib.import_module("raftmesh.runner.agents.builtin")
    importlib.import_module("raftmesh.runner.agents.chat")
    REGISTRY.load_entry_points()
    for ref in references:
        REGISTRY.load(ref)
    return REGISTRY
