"""The chat agent's security boundaries, over real HTTP on loopback: which URLs
get the peer's key, how much of a server's answer reaches errors and events,
and tools that must not stall the event loop.

The first tests run the agent in this process through ``run_attempt`` on a real
SQLite store, exactly as a peer runs it, against the stub model server and
plain listeners; the last ones (slow) go through real peer processes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from chat_stub import MODEL, ChatStub
from support import eventually

from raftmesh.consensus.spec import RunSpec
from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.runner.agents.chat import EXCERPT_CHARS, _call_tool, tool
from raftmesh.runner.attempt import FAILED, RETRY, SUCCEEDED, Assignment, Outcome, run_attempt
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.payload import event_data, unpack
from raftmesh.runner.registry import InvalidInput, build_registry
from raftmesh.storage import Store

KEY_ENV = "RAFTMESH_TEST_CHAT_KEY"
BOMB = "(((10**100)**100)**100)**100"


class Listener:
    """An HTTP server that records every request's path and headers and
    answers each with one canned response."""

    def __init__(self, status: int = 200, body: str = "", headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers)))
        return web.Response(status=self.status, text=self.body, headers=self.headers)


@pytest.fixture
async def listen() -> AsyncIterator[Callable[..., Awaitable[Listener]]]:
    started: list[Listener] = []

    async def make(**kw: Any) -> Listener:
        listener = Listener(**kw)
        await listener.start()
        started.append(listener)
        return listener

    yield make
    for listener in reversed(started):
        await listener.stop()


def chat_job(input: Any, run_id: str) -> Assignment:
    return Assignment(
        run_id=run_id, epoch=1, attempt=1, spec=RunSpec("chat", input=input, timeout_s=60)
    )


async def run_chat(
    store: Store, input: Any, models: dict[str, ModelEndpoint], run_id: str = "run-1"
) -> Outcome:
    return await run_attempt(
        chat_job(input, run_id),
        peer_id="p",
        store=store,
        registry=build_registry(),
        clock_ms=lambda: int(time.time() * 1000),
        models=models,
    )


def prompt_for(name: str) -> dict[str, Any]:
    return {"prompt": f"{name}: 6*7 and five words?", "tools": ["calculator", "word_count"]}


async def test_base_url_in_the_input_fails_the_run_and_the_listener_gets_nothing(
    store, stub, listen, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "stub-key")
    models = {"default": ModelEndpoint(stub.url, MODEL, KEY_ENV)}
    thief = await listen()

    outcome = await run_chat(store, {"prompt": "hello", "base_url": thief.url}, models)

    assert outcome.status == FAILED, "not retried: no attempt could run this input"
    assert "base_url" in (outcome.error or "") and "default" in (outcome.error or "")
    assert thief.requests == [], "nothing, let alone the key, went to the input's URL"
    assert stub.requests == []
    with pytest.raises(InvalidInput, match="configured models: default"):
        build_registry().check_input("chat", {"prompt": "x", "base_url": thief.url}, models)


async def test_unknown_model_name_fails_naming_the_configured_ones(store, stub, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "stub-key")
    models = {
        "default": ModelEndpoint(stub.url, MODEL, KEY_ENV),
        "small": ModelEndpoint(stub.url, MODEL, KEY_ENV),
    }
    outcome = await run_chat(store, {"prompt": "hello", "model": "gpt-elsewhere"}, models)
    assert outcome.status == FAILED
    assert outcome.error is not None
    assert "'gpt-elsewhere'" in outcome.error and "default, small" in outcome.error
    assert stub.requests == []


async def test_a_configured_model_gets_its_key_and_answers(store, stub, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "stub-key")
    models = {"local": ModelEndpoint(stub.url + "/", MODEL, KEY_ENV)}
    chat_input = {**prompt_for("configured"), "model": "local"}

    outcome = await run_chat(store, chat_input, models)

    assert outcome.status == SUCCEEDED, outcome
    assert [s for _, _, s in stub.requests] == [200, 200], "the stub answers 401 without the key"
    row = await store.get_run("run-1")
    assert row is not None and row.result is not None
    assert unpack(row.result)["answer"] == "6*7 is 42 and the text has 5 words."


async def test_a_redirect_from_the_endpoint_is_not_followed(store, listen, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k3y-value")
    thief = await listen()
    endpoint = await listen(status=307, headers={"Location": f"{thief.url}/chat/completions"})
    models = {"default": ModelEndpoint(endpoint.url, MODEL, KEY_ENV)}

    outcome = await run_chat(store, {"prompt": "hello"}, models)

    assert outcome.status == RETRY and "redirects are not followed" in (outcome.error or "")
    assert [h.get("Authorization") for _, h in endpoint.requests] == ["Bearer k3y-value"]
    assert thief.requests == []


async def test_long_error_bodies_reach_errors_and_events_only_as_a_redacted_excerpt(
    store, listen, monkeypatch
):
    key = "k3y-value-echoed-back"
    monkeypatch.setenv(KEY_ENV, key)
    leaky = (
        f"<html>internal page; you sent {key}; Authorization: Bearer sk-live-abcdef123456 "
        + "row " * 2000
        + "TAIL-OF-THE-PAGE</html>"
    )
    not_found = await listen(status=404, body=leaky)
    outcome = await run_chat(
        store, {"prompt": "hi"}, {"default": ModelEndpoint(not_found.url, MODEL, KEY_ENV)}
    )
    assert outcome.status == RETRY and outcome.error is not None
    assert outcome.error.startswith("ModelCallFailed: HTTP 404: <html>internal page")
    assert len(outcome.error) <= len("ModelCallFailed: HTTP 404: ") + EXCERPT_CHARS + 1
    for secret in (key, "sk-live-abcdef123456", "TAIL-OF-THE-PAGE"):
        assert secret not in outcome.error

    overloaded = await listen(status=503, body=leaky, headers={"Retry-After": "0"})
    models = {"default": ModelEndpoint(overloaded.url, MODEL, KEY_ENV)}
    outcome = await run_chat(store, {"prompt": "hi"}, models, run_id="run-2")
    assert outcome.status == RETRY and outcome.error is not None
    retries = [event_data(e.data) for e in await store.read_events("run-2")]
    assert retries and all(r["status"] == 503 for r in retries)
    assert outcome.error.endswith(retries[-1]["body"])
    assert (
        len(outcome.error) <= len("ModelCallFailed: HTTP 503 after 6 retries: ") + EXCERPT_CHARS + 1
    )
    for text in [outcome.error, *(r["body"] for r in retries)]:
        assert len(text) <= len(outcome.error), text
        for secret in (key, "sk-live-abcdef123456", "TAIL-OF-THE-PAGE"):
            assert secret not in text


def test_calculator_refuses_oversized_integers_before_computing_them():
    for expression in ("(10**100)**100", "(10**1000)*(10**1000)", "(-8)**0.5"):
        output = asyncio.run(_call_tool("calculator", json.dumps({"expression": expression})))
        assert isinstance(output, dict) and "ValueError" in output["error"], (expression, output)
    assert asyncio.run(_call_tool("calculator", '{"expression": "2**100 + 6*7"}')) == 2**100 + 42
    assert asyncio.run(_call_tool("calculator", '{"expression": "10**100 * 10**100"}')) == 10**200


async def test_a_slow_tool_answers_an_error_at_its_timeout_while_the_loop_runs():
    @tool("test_slow_tool", "Sleeps.", {"type": "object", "properties": {}}, timeout_s=0.5)
    def slow() -> str:
        time.sleep(3)
        return "late"

    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    output = await _call_tool("test_slow_tool", "{}")
    elapsed = time.monotonic() - started
    ticker.cancel()

    assert output == {"error": "tool test_slow_tool did not answer within 0.5s"}
    assert elapsed < 1.5
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert len(ticks) > 10 and max(gaps) < 0.25, "the event loop kept running"


# -- through real peers ----------------------------------------------------------


def chat_env(stub: ChatStub) -> dict[str, str]:
    return {
        "MESH_CHAT_BASE_URL": stub.url,
        "MESH_CHAT_MODEL": MODEL,
        "MESH_CHAT_API_KEY": "stub-key",
    }


@pytest.mark.slow
async def test_a_peer_refuses_a_url_or_unknown_model_at_submission_and_serves_its_own(
    make_mesh, stub, listen
):
    thief = await listen()
    mesh = await make_mesh("sqlite", nodes=1, env=chat_env(stub))
    async with MeshClient(mesh.peers[0].url) as client:
        with pytest.raises(MeshHTTPError) as refused:
            await client.submit("chat", {"prompt": "hello", "base_url": thief.url})
        assert refused.value.status == 400 and "base_url" in refused.value.message
        assert "configured models: default" in refused.value.message
        with pytest.raises(MeshHTTPError) as unknown:
            await client.submit("chat", {"prompt": "hello", "model": "elsewhere"})
        assert unknown.value.status == 400 and "'elsewhere'" in unknown.value.message

        run_id = (await client.submit("chat", prompt_for("peer")))["id"]
        run = await client.wait(run_id, 30)
        assert run["status"] == "succeeded", run
        assert run["result"]["answer"] == "6*7 is 42 and the text has 5 words."
    assert thief.requests == [], "the peer's key never left for the input's URL"


@pytest.mark.slow
async def test_a_calculator_bomb_errors_in_seconds_while_the_peer_keeps_answering(make_mesh):
    bomb_stub = ChatStub(fail_first=0, expression=BOMB)
    await bomb_stub.start()
    try:
        mesh = await make_mesh("sqlite", nodes=1, env=chat_env(bomb_stub))
        async with MeshClient(mesh.peers[0].url, timeout_s=1) as client:
            run_id = (await client.submit("chat", prompt_for("bomb"), timeout_s=60))["id"]
            missed: list[float] = []

            async def finished() -> dict[str, Any] | None:
                if not await client.healthz():
                    missed.append(time.monotonic())
                run = await client.get_run(run_id)
                return run if run["status"] in ("succeeded", "failed") else None

            run = await eventually(finished, 15, "the chat run to finish", poll_s=0.2)
            assert missed == [], "the peer answered /healthz throughout"
        assert run["status"] == "succeeded", run
        tool_answer = json.loads(run["result"]["messages"][2]["content"])
        assert "larger than" in tool_answer["error"]
    finally:
        await bomb_stub.stop()
