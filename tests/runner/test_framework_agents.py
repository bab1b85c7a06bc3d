"""The langgraph and openai_agent built-ins in process, on real SQLite: what
they accept, how an interrupted graph waits, and a peer without the extras."""

from __future__ import annotations

import asyncio
import operator
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from raftmesh.consensus.spec import RunSpec
from raftmesh.runner.attempt import FENCED, RETRY, SUCCEEDED, SUSPENDED, Assignment, run_attempt
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.payload import event_data, pack, unpack
from raftmesh.runner.registry import InvalidInput, build_registry
from raftmesh.storage import Store, open_store


class Asked(TypedDict):
    question: str
    answer: str
    confirmed: bool


ASKED: list[str] = []


def _ask(state: Asked) -> dict[str, Any]:
    answer = interrupt({"question": state["question"]})
    ASKED.append("ask answered")
    if ANSWER_HOLDS.is_set():
        ANSWERED.set()
        time.sleep(0.5)  # long enough for the test to fence this owner
    return {"answer": answer}


def _confirm(state: Asked) -> dict[str, Any]:
    return {"confirmed": interrupt(f"really {state['answer']}?")}


def _before(state: Asked) -> dict[str, Any]:
    ASKED.append("before")
    return {}


def _after(state: Asked) -> dict[str, Any]:
    ASKED.append("after")
    return {}


ANSWER_HOLDS = threading.Event()
ANSWERED = threading.Event()


def _build() -> Any:
    graph = StateGraph(Asked)
    for name, node in (("before", _before), ("ask", _ask), ("confirm", _confirm)):
        graph.add_node(name, node)
    graph.add_node("after", _after)
    graph.add_edge(START, "before")
    graph.add_edge("before", "ask")
    graph.add_edge("ask", "confirm")
    graph.add_edge("confirm", "after")
    graph.add_edge("after", END)
    return graph


# Uncompiled on purpose: the agent compiles a StateGraph it is handed.
asks_a_person = _build()
ASKS = {"graph": "test_framework_agents:asks_a_person", "input": {"question": "ship it?"}}


def _clock() -> int:
    return int(time.time() * 1000)


def _attempt(store: Store, epoch: int, suspend_after_s: float | None = 5.0) -> Any:
    return run_attempt(
        Assignment(run_id="r1", epoch=epoch, attempt=epoch, spec=RunSpec("langgraph", ASKS)),
        peer_id=f"p{epoch}",
        store=store,
        registry=build_registry(),
        clock_ms=_clock,
        suspend_after_s=suspend_after_s,
    )


def _signal_wait(index: int) -> dict[str, Any]:
    return {"kind": "signal", "signal": "resume", "index": index, "due_ms": None}


async def test_each_interrupt_suspends_the_run_until_a_resume_signal_answers_it(
    tmp_path: Path,
) -> None:
    """Two interrupts in a row, each answered by its own signal; a null
    signal (which LangGraph cannot resume with) is passed over."""
    store = open_store(f"sqlite:///{tmp_path / 'mesh.db'}")
    await store.open()
    ASKED.clear()
    try:
        first = await _attempt(store, 1)
        assert (first.status, first.wait) == (SUSPENDED, _signal_wait(0))
        await store.put_signal("r1", "resume", pack(None), None, _clock())
        second = await _attempt(store, 2)
        assert (second.status, second.wait) == (SUSPENDED, _signal_wait(1)), "null is no answer"
        await store.put_signal("r1", "resume", pack("yes"), None, _clock())
        third = await _attempt(store, 3)
        assert (third.status, third.wait) == (SUSPENDED, _signal_wait(2)), "the second interrupt"
        await store.put_signal("r1", "resume", pack(True), None, _clock())
        assert (await _attempt(store, 4)).status == SUCCEEDED

        row = await store.get_run("r1")
        assert row is not None and row.result is not None
        assert unpack(row.result) == {"question": "ship it?", "answer": "yes", "confirmed": True}
        assert ASKED == ["before", "ask answered", "after"], "no node ran again"
        events = [(e.kind, event_data(e.data)) for e in await store.read_events("r1")]
        asked = [d["interrupts"] for k, d in events if k == "interrupt"]
        assert [[i["value"] for i in a] for a in asked] == [
            [{"question": "ship it?"}],
            ["really yes?"],
        ], "each interrupt said once, though the first was replayed twice"
        assert all(len(a) == 1 and a[0]["id"] for a in asked)
        steps = [s.name for s in await store.load_steps("r1")]
        assert steps == [
            "langgraph:flow",  # attempt 1
            "langgraph:flow",  # the first interrupt
            "signal:resume",  # null, passed over by attempt 2, which then suspends
            "signal:resume",  # "yes", taken by attempt 3 as it replays
            "langgraph:flow",  # attempt 3's own events follow
            "langgraph:flow",  # the second interrupt
            "signal:resume",  # True, taken by attempt 4
            "langgraph:flow",  # attempt 4
        ]
    finally:
        await store.close()


async def test_a_resume_cut_short_by_a_newer_owner_is_answered_again_with_the_same_value(
    tmp_path: Path,
) -> None:
    """The owner that took the signal is fenced while the answered node runs,
    before the graph stored its outcome: the next owner answers the same
    interrupt with the journaled value again, and the signal after it is
    left for the next interrupt."""
    store = open_store(f"sqlite:///{tmp_path / 'mesh.db'}")
    await store.open()
    ASKED.clear()
    ANSWERED.clear()
    ANSWER_HOLDS.set()
    try:
        assert (await _attempt(store, 1)).status == SUSPENDED
        await store.put_signal("r1", "resume", pack("yes"), None, _clock())
        await store.put_signal("r1", "resume", pack(True), None, _clock())
        second = asyncio.ensure_future(_attempt(store, 2))
        await asyncio.get_running_loop().run_in_executor(None, ANSWERED.wait, 10)
        run = await store.get_run("r1")
        assert run is not None
        await store.claim(run, 3, "p3", 0)  # what a new owner does first
        assert (await second).status == FENCED
        ANSWER_HOLDS.clear()
        assert (await _attempt(store, 4)).status == SUCCEEDED

        row = await store.get_run("r1")
        assert row is not None and row.result is not None
        assert unpack(row.result) == {"question": "ship it?", "answer": "yes", "confirmed": True}
        assert ASKED == ["before", "ask answered", "ask answered", "after"], (
            "only the node the fence cut ran again"
        )
    finally:
        ANSWER_HOLDS.clear()
        await store.close()


class Gathered(TypedDict):
    got: Annotated[list[str], operator.add]


def _asks(name: str) -> Any:
    def run(state: Gathered) -> dict[str, Any]:
        return {"got": [f"{name}={interrupt(f'{name}?')}"]}

    return run


asks_in_parallel = StateGraph(Gathered)
for _name in ("a", "b"):
    asks_in_parallel.add_node(_name, _asks(_name))
    asks_in_parallel.add_edge(START, _name)
    asks_in_parallel.add_edge(_name, END)


async def test_interrupts_pending_at_once_take_one_signal_that_maps_their_ids(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'mesh.db'}")
    await store.open()
    try:
        graph = {"graph": "test_framework_agents:asks_in_parallel", "input": {"got": []}}
        spec = RunSpec("langgraph", graph)

        def attempt(epoch: int) -> Any:
            return run_attempt(
                Assignment(run_id="r1", epoch=epoch, attempt=epoch, spec=spec),
                peer_id="p1",
                store=store,
                registry=build_registry(),
                clock_ms=_clock,
                suspend_after_s=5.0,
            )

        assert (await attempt(1)).status == SUSPENDED
        events = [event_data(e.data) for e in await store.read_events("r1")]
        asked = next(e["interrupts"] for e in events if "interrupts" in e)
        assert sorted(i["value"] for i in asked) == ["a?", "b?"]
        await store.put_signal("r1", "resume", pack({"0" * 32: "x"}), None, _clock())
        unknown_id = await attempt(2)
        assert (unknown_id.status, unknown_id.wait) == (SUSPENDED, _signal_wait(1)), (
            "data for no pending interrupt answers none: they are asked again"
        )
        answers = {i["id"]: i["value"].upper() for i in asked}
        await store.put_signal("r1", "resume", pack(answers), None, _clock())
        assert (await attempt(3)).status == SUCCEEDED
        row = await store.get_run("r1")
        assert row is not None and row.result is not None
        assert sorted(unpack(row.result)["got"]) == ["a=A?", "b=B?"]
    finally:
        await store.close()


async def test_without_suspension_an_interrupted_graph_waits_in_its_slot_until_its_timeout(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'mesh.db'}")
    await store.open()
    try:
        spec = RunSpec(agent="langgraph", input=ASKS, timeout_s=1.5)
        job = Assignment(run_id="r1", epoch=1, attempt=1, spec=spec)
        started = time.monotonic()
        outcome = await run_attempt(
            job, peer_id="p1", store=store, registry=build_registry(), clock_ms=_clock
        )
        assert outcome.status == RETRY and outcome.kind == "timeout", outcome
        assert time.monotonic() - started >= 1.5, "it held on while it waited"
        events = [(e.kind, event_data(e.data)) for e in await store.read_events("r1")]
        asked = [[i["value"] for i in d["interrupts"]] for k, d in events if k == "interrupt"]
        assert asked == [[{"question": "ship it?"}]]
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
        "['approval', 'chat', 'echo', 'sleep']",
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
