"""The chat agent (in the peer's process and in an isolated one), the OpenAI
Agents SDK agent and the LangGraph example take their endpoint's rate limit
from configuration: with no lease their model call waits in the limiter and
the model server hears nothing; a lease lets it through, and the concurrent
call it held is given back. Run through ``run_attempt`` on a real SQLite store
against the stub model server, exactly as a peer runs it."""

from __future__ import annotations

import asyncio
import time

import pytest
from chat_stub import MODEL, ChatStub
from support import eventually

from raftmesh.consensus.spec import RunSpec
from raftmesh.runner.attempt import FAILED, SUCCEEDED, Assignment, run_attempt
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.rate_limits import Limiter, RateLimit
from raftmesh.runner.registry import build_registry
from raftmesh.storage import Store

KEY_ENV = "RAFTMESH_TEST_CHAT_KEY"


PROMPT = "What is 6*7, and how many words are in the sentence? (limited)"
AGENTS = {
    "chat": ("chat", {"prompt": PROMPT, "tools": ["calculator", "word_count"]}, "task"),
    "chat isolated": (
        "chat",
        {"prompt": PROMPT, "tools": ["calculator", "word_count"]},
        "process",
    ),
    "openai_agent": (
        "openai_agent",
        {"agent": "framework_agents:calculator_agent", "input": PROMPT},
        "task",
    ),
    "langgraph": (
        "langgraph",
        {
            "graph": "examples.langgraph_research:graph",
            "input": {"messages": [{"role": "user", "content": PROMPT}]},
        },
        "task",
    ),
}


@pytest.mark.parametrize("case", list(AGENTS))
async def test_a_model_call_waits_for_a_lease_of_its_endpoints_limit(
    store: Store, stub: ChatStub, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.setenv(KEY_ENV, "stub-key")
    agent, input, isolation = AGENTS[case]
    waits: list[float] = []
    limiter = Limiter(
        {"stub": RateLimit(rpm=600, concurrent=1)}, on_wait=lambda _, s: waits.append(s)
    )
    spec = RunSpec(
        agent,
        input=input,
        timeout_s=60,
        isolation=isolation,
        memory_limit_mb=1024 if isolation == "process" else None,
    )
    attempt = asyncio.create_task(
        run_attempt(
            Assignment(run_id="run-1", epoch=1, attempt=1, spec=spec),
            peer_id="p",
            store=store,
            registry=build_registry(),
            clock_ms=lambda: int(time.time() * 1000),
            models={"default": ModelEndpoint(stub.url, MODEL, KEY_ENV, rate_limit="stub")},
            isolation_env=(KEY_ENV,),
            rate_limiter=limiter,
        )
    )

    async def waiting() -> bool:
        return limiter.demand().get("stub", {}).get("waiting") == 1

    await eventually(waiting, 30, "the model call to wait in the limiter")
    assert stub.requests == [], "no lease: the server heard nothing"

    limiter.renew({"stub": {"requests": [5.0, 10.0], "concurrent": 1}}, time.monotonic(), 60.0)
    outcome = await asyncio.wait_for(attempt, 60)

    assert outcome.status == SUCCEEDED, outcome
    assert [turn for _, turn, _ in stub.requests] == [0, 1]
    assert len(waits) == 2, "each model call waited in the limiter"
    assert limiter.demand()["stub"]["in_use"] == 0, "each call gave its slot back"


@pytest.mark.parametrize("isolation", ["task", "process"])
async def test_an_endpoint_limit_the_peer_lacks_fails_the_run_without_calling(
    store: Store, stub: ChatStub, monkeypatch: pytest.MonkeyPatch, isolation: str
) -> None:
    monkeypatch.setenv(KEY_ENV, "stub-key")
    _, input, _ = AGENTS["chat"]
    spec = RunSpec("chat", input=input, timeout_s=60, isolation=isolation)
    outcome = await run_attempt(
        Assignment(run_id="run-1", epoch=1, attempt=1, spec=spec),
        peer_id="p",
        store=store,
        registry=build_registry(),
        clock_ms=lambda: int(time.time() * 1000),
        models={"default": ModelEndpoint(stub.url, MODEL, KEY_ENV, rate_limit="stub")},
        isolation_env=(KEY_ENV,),
        rate_limiter=Limiter({"other": RateLimit(rpm=60)}),
    )
    assert outcome.status == FAILED, outcome
    assert "no rate limit named 'stub' on this peer; configured: other" in (outcome.error or "")
    assert stub.requests == []
