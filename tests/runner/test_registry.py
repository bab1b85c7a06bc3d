"""Registries are built explicitly: no import registers an agent anywhere."""

from __future__ import annotations

import sys
import types

import pytest

from raftmesh.mesh.settings import Settings
from raftmesh.runner.registry import DEMO_AGENTS, UnknownAgent, agent, build_registry


def test_a_production_peer_runs_only_the_builtins() -> None:
    # langgraph and openai_agent: their extras are installed in the test venv
    # (test_framework_agents.py shows a peer without them).
    assert build_registry().names() == [
        "approval",
        "chat",
        "echo",
        "langgraph",
        "openai_agent",
        "sleep",
    ]
    assert Settings().demo_agents is False
    with pytest.raises(UnknownAgent):
        build_registry().get("hog")


def test_the_demo_agents_come_only_when_asked_for_and_travel_to_an_isolated_child() -> None:
    registry = build_registry(demo=True)
    assert {"hog", "fail", "fanout", "durable", "steps", "flaky"} <= set(registry.names())
    assert registry.references == [DEMO_AGENTS]
    child = build_registry(tuple(registry.references))
    assert child.names() == registry.names()


def test_two_registries_do_not_see_each_other_and_a_module_loads_what_it_defines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = types.ModuleType("my_agents")

    @agent("mine")
    async def mine(ctx: object, input: object) -> object:
        return input

    mine.__module__ = "my_agents"
    module.mine = mine  # type: ignore[attr-defined]
    # Imported from elsewhere: a re-export is not this module's agent.
    module.echo = build_registry().get("echo")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_agents", module)
    first = build_registry(("my_agents",))
    assert "mine" in first.names()
    assert "mine" not in build_registry().names()
    by_reference = build_registry(("my_agents:mine",))
    assert by_reference.get("mine") is mine
