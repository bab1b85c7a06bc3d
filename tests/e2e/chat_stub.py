"""A small OpenAI-compatible /v1/chat/completions server for tests, on loopback.

It plays one scripted conversation per prompt, and it really reads what it is
sent: turn 0 (no tool results yet) asks for two tools, ``calculator`` and
``word_count``; turn 1 answers from the tool results found in the request, so
a wrong tool dispatch shows up in the answer. Answers stream as SSE chunks,
tool-call arguments split over several chunks, usage in the last chunk, the
way real servers (OpenAI, vLLM) send them.

Offered ``send_email`` (tests/e2e/approval_tools.py, a tool that requires
approval), it plays another conversation: turn 0 asks for two mails,
``call_mail_0`` and ``call_mail_1``; turn 1 answers with the tool results it
was sent, which ``tool_results`` also records per prompt, so a test sees what
the model was told of an approved and a denied call.

Knobs: ``expression`` is what turn 0 asks the calculator (default ``6*7``);
``fail_first`` answers the first N requests of a conversation with 429
(Retry-After 0.1 s); ``hold_turn`` parks requests of that turn until
``release`` is set, so a test can kill the owner while a call is in flight.
Every request is recorded as (prompt, turn, status), and in ``arrivals`` as
(monotonic time it arrived, prompt): rate limits are measured here.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL = "stub-model"


@dataclass
class ChatStub:
    fail_first: int = 1
    expression: str = "6*7"
    hold_turn: int | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[tuple[str, int, int]] = field(default_factory=list)
    arrivals: list[tuple[float, str]] = field(default_factory=list)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    tool_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self.url

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def calls(self, prompt: str, turn: int, status: int = 200) -> int:
        return sum(1 for p, t, s in self.requests if (p, t, s) == (prompt, turn, status))

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        if request.headers.get("Authorization") != "Bearer stub-key":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        body = await request.json()
        assert body["model"] == MODEL and body["stream"] is True
        messages = body["messages"]
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        turn = sum(1 for m in messages if m["role"] == "assistant")
        self.arrivals.append((arrived, prompt))
        if sum(1 for p, _, _ in self.requests if p == prompt) < self.fail_first:
            self.requests.append((prompt, turn, 429))
            return web.json_response(
                {"error": {"message": "rate limited"}}, status=429, headers={"Retry-After": "0.1"}
            )
        self.requests.append((prompt, turn, 200))
        if self.hold_turn == turn:
            self.held.set()
            await self.release.wait()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in self._script(body, turn):
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _script(self, body: dict[str, Any], turn: int) -> list[dict[str, Any]]:
        names = {t["function"]["name"] for t in body.get("tools", [])}
        if "send_email" in names:
            return self._mail_script(body, turn)
        if turn == 0:
            assert names == {"calculator", "word_count"}, names
            calc = json.dumps({"expression": self.expression})
            words = json.dumps({"text": "the quick brown fox jumps"})
            return [
                _delta({"tool_calls": [_call(0, "call_calc", "calculator", calc[:10])]}),
                _delta({"tool_calls": [_call(0, None, None, calc[10:])]}),
                _delta({"tool_calls": [_call(1, "call_words", "word_count", words)]}),
                _usage(30, 12),
            ]
        results = {
            m["tool_call_id"]: json.loads(m["content"])
            for m in body["messages"]
            if m["role"] == "tool"
        }
        answer = f"6*7 is {results['call_calc']} and the text has {results['call_words']} words."
        words_out = answer.split(" ")
        return [
            _delta({"content": w + ("" if i == len(words_out) - 1 else " ")})
            for i, w in enumerate(words_out)
        ] + [_usage(60, len(words_out))]

    def _mail_script(self, body: dict[str, Any], turn: int) -> list[dict[str, Any]]:
        if turn == 0:
            mails = [
                json.dumps({"to": f"ops{i}@example.com", "subject": f"deploy v{i}"})
                for i in range(2)
            ]
            return [
                _delta({"tool_calls": [_call(i, f"call_mail_{i}", "send_email", args)]})
                for i, args in enumerate(mails)
            ] + [_usage(20, 10)]
        prompt = next(m["content"] for m in body["messages"] if m["role"] == "user")
        results = {
            m["tool_call_id"]: json.loads(m["content"])
            for m in body["messages"]
            if m["role"] == "tool"
        }
        self.tool_results[prompt] = results
        answer = " | ".join(str(results[f"call_mail_{i}"]) for i in range(2))
        return [_delta({"content": answer}), _usage(40, 10)]


def _delta(delta: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta}],
    }


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _call(index: int, id: str | None, name: str | None, args: str) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if id is not None:
        call["id"] = id
        call["type"] = "function"
    if name is not None:
        call["function"]["name"] = name
    return call
