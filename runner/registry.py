"""Which agents this peer can run, by name.

``@agent("name")`` only names a function; a registry is built explicitly by
``build_registry`` from the built-ins, ``module`` or ``module:function``
references in the peer's settings, and installed distributions that declare
entry points in the ``raftmesh.agents`` group (``name = "module:function"``).
No import registers anything anywhere, so two registries in one process (a
test, an isolated child) cannot see each other's agents.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from raftmesh.runner.context import RunError
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
# The built-ins of the framework integrations: name -> (module, function, the
# package their extra installs). A peer registers one only where that package
# is found, without importing it: LangGraph and the Agents SDK take seconds
# and ~100 MB to import, on every peer and every isolated child, so they are
# imported on an agent's first run, off the event loop.
OPTIONAL_AGENTS = {
    "langgraph": ("raftmesh.runner.integrations.langgraph", "run_graph", "langgraph"),
    "openai_agent": ("raftmesh.runner.integrations.openai_agents", "run_openai_agent", "agents"),
}
INTEGRATION_INPUTS = "raftmesh.runner.integrations.inputs"
DEMO_AGENTS = "raftmesh.runner.agents.demo"


class DeferredAgent:
    """An agent whose module is imported on its first run (in a thread, so the
    peer keeps answering meanwhile); its input check needs no import of it."""

    def __init__(self, name: str, module: str, function: str) -> None:
        self.agent_name = name
        self._module = module
        self._function = function

    async def __call__(self, ctx: Any, input: Any) -> Any:
        try:
            module = await asyncio.to_thread(importlib.import_module, self._module)
        except ExtraMissing as exc:
            raise RunError(str(exc)) from exc
        return await getattr(module, self._function)(ctx, input)

    def input_check(self, input: Any, models: Mapping[str, ModelEndpoint]) -> None:
        importlib.import_module(INTEGRATION_INPUTS).CHECKS[self.agent_name](input, models)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ImportError:
        return False


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
    for name, (module, function, package) in OPTIONAL_AGENTS.items():
        if _installed(package):
            registry.add(name, DeferredAgent(name, module, function))
        else:
            log.info("agent %s not available: %s is not installed", name, package)
    registry.references.clear()
    registry.load_entry_points()
    for ref in ((DEMO_AGENTS,) if demo else ()) + tuple(references):
        registry.load(ref)
    return registry
