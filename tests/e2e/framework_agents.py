"""Agents written with other frameworks, for test peers (PYTHONPATH=tests/e2e).

``six_nodes`` is a LangGraph graph of six nodes in a row; each node appends to
a ledger file outside the mesh when it starts and when it ends, so a test sees
a node that ran twice even when only one of its runs was checkpointed.
``needs_approval`` drafts (ledgered), asks twice with ``interrupt()`` (approval,
then a note; the answer is ledgered once it is in) and publishes (ledgered).
``calculator_agent`` is an OpenAI Agents SDK agent with the two tools the chat
stub (chat_stub.py) plays its conversation with.
"""

from __future__ import annotations

import operator
import os
import time
from typing import Annotated, Any, TypedDict

from agents import Agent, function_tool
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

NODES = [f"n{i}" for i in range(6)]


class Ledgered(TypedDict):
    ledger: str
    node_seconds: float
    done: Annotated[list[str], operator.add]


def append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_ledger(path: str) -> list[tuple[str, int, str]]:
    """(node, pid, "start"|"end") per line."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return []
    return [(n, int(pid), what) for n, pid, what in (line.split() for line in lines)]


def _node(name: str) -> Any:
    def run(state: Ledgered) -> dict[str, Any]:
        append(state["ledger"], f"{name} {os.getpid()} start")
        time.sleep(state["node_seconds"])
        append(state["ledger"], f"{name} {os.getpid()} end")
        return {"done": [name]}

    return run


def _build() -> Any:
    graph = StateGraph(Ledgered)
    for name in NODES:
        graph.add_node(name, _node(name))
    for a, b in zip([START, *NODES], [*NODES, END], strict=True):
        graph.add_edge(a, b)
    return graph.compile()


six_nodes = _build()


class Approval(TypedDict, total=False):
    ledger: str
    draft: str
    approved: Any
    note: Any
    published: bool


def _draft(state: Approval) -> dict[str, Any]:
    append(state["ledger"], f"draft {os.getpid()} start")
    append(state["ledger"], f"draft {os.getpid()} end")
    return {"draft": "release notes v7"}


def _approve(state: Approval) -> dict[str, Any]:
    approved = interrupt({"approve": state["draft"]})
    append(state["ledger"], f"approve {os.getpid()} end")
    return {"approved": approved}


def _note(state: Approval) -> dict[str, Any]:
    return {"note": interrupt({"note_for": state["draft"]})}


def _publish(state: Approval) -> dict[str, Any]:
    append(state["ledger"], f"publish {os.getpid()} start")
    append(state["ledger"], f"publish {os.getpid()} end")
    return {"published": True}


def _build_approval() -> Any:
    graph = StateGraph(Approval)
    steps = [("draft", _draft), ("approve", _approve), ("note", _note), ("publish", _publish)]
    for name, node in steps:
        graph.add_node(name, node)
    names = [name for name, _ in steps]
    for a, b in zip([START, *names], [*names, END], strict=True):
        graph.add_edge(a, b)
    return graph.compile()


needs_approval = _build_approval()


@function_tool
def calculator(expression: str) -> str:
    """Evaluate a product of integers such as 6*7."""
    product = 1
    for factor in expression.split("*"):
        product *= int(factor)
    return str(product)


@function_tool
def word_count(text: str) -> str:
    """Count the words of a text."""
    return str(len(text.split()))


calculator_agent = Agent(
    name="calculator",
    instructions="Answer with the tools' results.",
    tools=[calculator, word_count],
)
