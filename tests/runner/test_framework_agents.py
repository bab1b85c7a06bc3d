"""The langgraph and openai_agent built-ins in process, on real SQLite: what
they accept, how an interrupted graph waits, and a peer without the extras."""

from __future__ import annotations

import asyncio
import operator
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from raftmesh.consensus.spec import RunSpec
from raftmesh.runner.attempt import FENCED, RETRY, SUCCEEDED, Assignment, run_attempt
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.payload import event_data, unpack
from raftmesh.runner.registry import InvalidInput, build_registry
from raftmesh.storage import open_store


class Asked(TypedDict):
    question: str
    answer: str


def _ask(state: Asked) -> dict[str, Any]:
    return {"answer": interrupt({"question": state["question"]})}


def _build() -> Any:
    graph = StateGraph(Asked)
    graph.add_node("ask", _ask)
    graph.add_edge(START, "ask")
    graph.add_edge("ask", END)
    return graph


# Uncompiled on purpose: the agent compiles a StateGraph it is handed.
asks_a_person = _build()


async def test_an_interrupted_graph_says_so_and_keeps_running_until_its_timeout(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'mesh.db'}")
    await store.open()
    try:
        graph_input = {"question": "ship it?", "answer": ""}
        spec = RunSpec(
            agent="langgraph",
            input={"graph": "test_framework_agents:asks_a_person", "input": graph_input},
            timeout_s=1.5,
        )
        job = Assignment(run_id="r1", epoch=1, attempt=1, spec=spec)
        started = time.monotonic()
        outcome = await run_attempt(
            job,
            peer_id="p1",
            store=store,
            registry=build_registry(),
            clock_ms=lambda: int(time.time() * 1000),
        )
        assert outcome.status == RETRY and outcome.kind == "timeout", outcome
        assert time.monotonic() - started >= 1.5, "it held on while it waited"
        events = [(e.kind, event_data(e.data)) for e in await store.read_events("r1")]
        assert events == [("interrupt", {"interrupts": [{"question": "ship it?"}]})]
    finally:
        await store.close()


class Counted(TypedDict):
    done: Annotated[list[str], operator.add]


def _slow(name: str) -> Any:
    async def run(state: Counted) -> dict[str, Any]:
        get_stream_writer()({"node": name})
        RAN.append(name)
        if RAN == ["a", "b"]:
            SECOND_STARTED.set()
        await asyncio.sleep(0.3)
        return {"done": [name]}

    return run


RAN: list[str] = []
SECOND_STARTED = asyncio.Event()
three_slow = StateGraph(Counted)
for _name in ("a", "b", "c"):
    three_slow.add_node(_name, _slow(_name))
three_slow.add_edge(START, "a")
three_slow.add_edge("a", "b")
three_slow.add_edge("b", "c")
three_slow.add_edge("c", END)


async def test_a_deposed_owner_cannot_checkpoint_and_the_new_one_continues(
    tmp_path: Path,
) -> None:
    """The first owner is fenced by a newer claim while its graph runs: its
    next checkpoint write is refused and the attempt ends FENCED; the new
    owner continues from the last checkpoint the first one stored."""
    store = open_store(f"sqlite:///{tmp_path / 'mesh.db'}")
    await store.open()
    RAN.clear()
    SECOND_STARTED.clear()
    try:
        spec = RunSpec(
            agent="langgraph",
            input={"graph": "test_framework_agents:three_slow", "input": {"done": []}},
        )

        def attempt(epoch: int) -> Any:
            return run_attempt(
                Assignment(run_id="r1", epoch=epoch, attempt=epoch, spec=spec),
                peer_id=f"p{epoch}",
                store=store,
                registry=build_registry(),
                clock_ms=lambda: int(time.time() * 1000),
            )

        first = asyncio.ensure_future(attempt(1))
        await asyncio.wait_for(SECOND_STARTED.wait(), 10)
        run = await store.get_run("r1")
        assert run is not None
        await store.claim(run, 2, "p2", 0)  # what a new owner does first

        assert (await first).status == FENCED
        assert (await attempt(3)).status == SUCCEEDED
        assert RAN == ["a", "b", "b", "c"], "a was checkpointed and not run again"
        row = await store.get_run("r1")
        assert row is not None and row.result is not None
        assert unpack(row.result) == {"done": ["a", "b", "c"]}
        customs = [event_data(e.data) for e in await store.read_events("r1") if e.kind == "custom"]
        assert customs == [{"node": "a"}, {"node": "b"}, {"node": "b"}, {"node": "c"}]
    finally:
        await store.close()


MODELS = {"default": ModelEndpoint("http://127.0.0.1:9/v1", "m")}


@pytest.mark.parametrize(
    ("agent", "input", "message"),
    [
        ("langgraph", "graph", "must be"),
        ("langgraph", {"graph": "nocolon", "input": 1}, "module:attr"),
        ("langgraph", {"graph": "m:g"}, '"input"'),
        ("langgraph", {"graph": "m:g", "input": 1, "config": 3}, "config"),
        ("langgraph", {"graph": "m:g", "input": 1, "extra": 3}, "unknown keys"),
        ("openai_agent", {"agent": "m:a"}, '"input"'),
        ("openai_agent", {"agent": "m", "input": "hi"}, "module:attr"),
        ("openai_agent", {"agent": "m:a", "input": "hi", "model": "other"}, "unknown model"),
    ],
)
def test_inputs_they_can_never_run_are_refused_at_submission(
    agent: str, input: Any, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        build_registry().check_input(agent, input, MODELS)


BLOCK_EXTRAS = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("langgraph", "agents"):
            raise ImportError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Absent())
from raftmesh.runner.registry import build_registry
print(build_registry().names())
try:
    import raftmesh.runner.integrations.langgraph
except ImportError as exc:
    print(exc)
try:
    import raftmesh.runner.integrations.openai_agents
except ImportError as exc:
    print(exc)
"""


def test_a_peer_without_the_extras_starts_without_their_agents() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_EXTRAS], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "['chat', 'echo', 'sleep']",
        "langgraph is not installed: pip install 'raftmesh[langgraph]'",
        "openai-agents is not installed: pip install 'raftmesh[openai-agents]'",
    ]
    assert "Traceback" not in done.stderr


LIGHT_PEER = """
import sys
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.registry import InvalidInput, build_registry
registry = build_registry()
try:
    registry.check_input("langgraph", {"graph": "m:g"}, {})
except InvalidInput as exc:
    print(exc)
print(sorted(m for m in ("langgraph", "agents", "openai") if m in sys.modules))
"""


def test_registering_and_checking_inputs_import_no_framework() -> None:
    """Importing LangGraph and the Agents SDK takes seconds and ~100 MB: not
    at every peer's start, nor in every isolated child."""
    done = subprocess.run(
        [sys.executable, "-c", LIGHT_PEER], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        """langgraph input needs "input", the graph's input""",
        "[]",
    ]
