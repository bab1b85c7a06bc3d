"""Which agents this peer can run, by name.

``@agent("name")`` only names a function; a registry is built explicitly by
``build_registry`` from the built-ins, ``module`` or ``module:function``
references in the peer's settings, and installed distributions that declare
entry points in the ``raftmesh.agents`` group (``name = "module:function"``).
No import registers anything anywhere, so two registries in one process (a
test, an isolated child) cannot see each other's agents.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from raftmesh.runner.integrations import ExtraMissing
from raftmesh.runner.models import ModelEndpoint

AgentFn = Callable[..., Awaitable[Any]]
# Refuses (InvalidInput) an input its agent would refuse anyway, at submission.
InputCheck = Callable[[Any, Mapping[str, ModelEndpoint]], None]

ENTRY_POINT_GROUP = "raftmesh.agents"

log = logging.getLogger("raftmesh.runner")


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
        """``module``: every @agent function defined in it; ``module:function``:
        that one, under its @agent name or its own name."""
        module_name, _, attr = reference.partition(":")
        module = importlib.import_module(module_name)
        if attr:
            fn = getattr(module, attr)
            self.add(getattr(fn, "agent_name", attr), fn)
        else:
            for value in vars(module).values():
                name = getattr(value, "agent_name", None)
                if isinstance(name, str) and getattr(value, "__module__", None) == module_name:
                    self.add(name, value)
        if reference not in self.references:
            self.references.append(reference)

    def load_entry_points(self) -> None:
        """Agents of installed distributions: entry point ``name = "module:function"``
        registers the function under the entry point's name."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self.add(ep.name, ep.load())


BUILTIN_AGENTS = ("raftmesh.runner.agents.builtin", "raftmesh.runner.agents.chat")
# Built-ins of the framework integrations, each needing its extra: a peer
# without the extra starts without those agents (ExtraMissing on import).
OPTIONAL_AGENTS = (
    "raftmesh.runner.integrations.langgraph",
    "raftmesh.runner.integrations.openai_agents",
)
DEMO_AGENTS = "raftmesh.runner.agents.demo"


def agent(name: str, check: InputCheck | None = None) -> Callable[[AgentFn], AgentFn]:
    """Name an async function ``fn(ctx, input)`` as agent ``name``; a registry
    that loads its module (or the ``module:function`` reference) runs it.
    ``check(input, models)`` raises InvalidInput for inputs it can never run."""

    def name_it(fn: AgentFn) -> AgentFn:
        fn.agent_name = name  # type: ignore[attr-defined]
        if check is not None:
            fn.input_check = check  # type: ignore[attr-defined]
        return fn

    return name_it


def build_registry(references: tuple[str, ...] = (), demo: bool = False) -> Registry:
    """The built-ins, then the demo agents if asked for, then entry points and
    the settings' references. ``references`` of the result lists everything
    but the built-ins and entry points, so an isolated child can rebuild it."""
    registry = Registry()
    for module in BUILTIN_AGENTS:
        registry.load(module)
    for module in OPTIONAL_AGENTS:
        try:
            registry.load(module)
        except ExtraMissing as exc:
            log.info("agents of %s not loaded: %s", module, exc)
    registry.references.clear()
    registry.load_entry_points()
    for ref in ((DEMO_AGENTS,) if demo else ()) + tuple(references):
        registry.load(ref)
    return registry
