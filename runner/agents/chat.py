"""The built-in ``chat`` agent: any OpenAI-compatible /v1/chat/completions server.

Works with hosted APIs and self-hosted servers alike (vLLM, Ollama, llama.cpp):
the endpoint comes from the run's input or the peer's environment
(``MESH_CHAT_BASE_URL``, ``MESH_CHAT_MODEL``, ``MESH_CHAT_API_KEY``; the
``OPENAI_*`` names are read as a fallback). The key is never taken from the
input, so it never lands in storage.

Every model call and every tool call is a journaled step: a run resumed on
another peer replays finished calls from the journal and does not pay for them
twice. Tokens stream to watchers as ``token`` events while a call runs. 429 and
5xx answers are retried with exponential backoff (honouring ``Retry-After``).
Each call is charged to the run's budget (``model_calls`` and ``tokens``), so a
parent's budget bounds a whole tree of chat agents.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from raftmesh.runner.context import RunContext, RunError
from raftmesh.runner.registry import agent

MAX_TURNS = 8
MAX_RETRIES = 6
BACKOFF_S = 0.25
MAX_BACKOFF_S = 8.0
REQUEST_TIMEOUT_S = 300.0


class ModelCallFailed(Exception):
    """The endpoint kept failing (or refused the request) after every retry."""


class ChatConfigError(RunError):
    """The run cannot call a model: no endpoint or model configured."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]

    def spec(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


TOOLS: dict[str, Tool] = {}


def tool(
    name: str, description: str, parameters: dict[str, Any]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a Python function (sync or async, keyword arguments) as a tool
    the ``chat`` agent can offer the model; ``parameters`` is its JSON schema."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in TOOLS and TOOLS[name].fn is not fn:
            raise ValueError(f"tool {name!r} is registered twice")
        TOOLS[name] = Tool(name, description, parameters, fn)
        return fn

    return register


@dataclass(frozen=True)
class ChatConfig:
    base_url: str
    model: str
    api_key: str | None

    @classmethod
    def resolve(cls, input: dict[str, Any]) -> ChatConfig:
        env = os.environ
        base_url = (
            input.get("base_url") or env.get("MESH_CHAT_BASE_URL") or env.get("OPENAI_BASE_URL")
        )
        model = input.get("model") or env.get("MESH_CHAT_MODEL") or env.get("OPENAI_MODEL")
        if not base_url or not model:
            raise ChatConfigError(
                "chat needs an endpoint and a model: set MESH_CHAT_BASE_URL and "
                "MESH_CHAT_MODEL on the peers, or give base_url and model in the input"
            )
        key = env.get("MESH_CHAT_API_KEY") or env.get("OPENAI_API_KEY")
        return cls(base_url.rstrip("/"), model, key)


@agent("chat")
async def chat(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """Input: ``prompt`` (or ``messages``), optional ``system``, ``tools`` (names
    of registered tools), ``model``, ``base_url``, ``max_turns``, ``temperature``.
    Result: the final ``answer``, the whole ``messages`` list and ``usage``."""
    config = ChatConfig.resolve(input)
    messages: list[dict[str, Any]] = list(input.get("messages") or [])
    if input.get("system"):
        messages.insert(0, {"role": "system", "content": input["system"]})
    if input.get("prompt"):
        messages.append({"role": "user", "content": input["prompt"]})
    unknown = [name for name in input.get("tools", []) if name not in TOOLS]
    if unknown:
        raise ChatConfigError(f"unknown tools {unknown}; registered: {sorted(TOOLS)}")
    tools = [TOOLS[name] for name in input.get("tools", [])]
    options = {"temperature": input["temperature"]} if "temperature" in input else {}
    for turn in range(int(input.get("max_turns", MAX_TURNS))):
        ctx.require(model_calls=1)
        reply = await ctx.step(
            "model", _complete, ctx, config, messages, [t.spec() for t in tools], options, turn
        )
        ctx.charge(model_calls=1, tokens=reply["usage"].get("total_tokens", 0))
        message = reply["message"]
        messages.append(message)
        calls = message.get("tool_calls") or []
        if not calls:
            return {
                "answer": message.get("content") or "",
                "messages": messages,
                "usage": ctx.spent,
            }
        for call in calls:
            fn = call["function"]
            output = await ctx.step(f"tool:{fn['name']}", _run_tool, fn["name"], fn["arguments"])
            ctx.emit("tool", {"name": fn["name"], "output": output})
            messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(output)}
            )
    raise ModelCallFailed(f"no final answer after {input.get('max_turns', MAX_TURNS)} turns")


async def _run_tool(name: str, arguments: str) -> Any:
    """A tool's answer, or its error as the model should see it (it may retry)."""
    try:
        kwargs = json.loads(arguments or "{}")
        value = TOOLS[name].fn(**kwargs)
        if inspect.isawaitable(value):
            value = await value
        return value
    except Exception as exc:  # reported to the model, which decides what to do next
        return {"error": f"{type(exc).__name__}: {exc}"}


async def _complete(
    ctx: RunContext,
    config: ChatConfig,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    options: dict[str, Any],
    turn: int,
) -> dict[str, Any]:
    """One model call, streamed, retried on 429/5xx and connection errors."""
    body: dict[str, Any] = {
        "model": config.model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        **options,
    }
    if tools:
        body["tools"] = tools
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    delay = BACKOFF_S
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
        for attempt in range(MAX_RETRIES + 1):
            try:
                async with http.post(f"{config.base_url}/chat/completions", json=body) as resp:
                    if resp.status == 429 or resp.status >= 500:
                        text = await resp.text()
                        wait = _retry_after(resp.headers.get("Retry-After"), delay)
                        ctx.emit(
                            "model.retry",
                            {
                                "turn": turn,
                                "status": resp.status,
                                "wait_s": wait,
                                "body": text[:200],
                            },
                        )
                        if attempt == MAX_RETRIES:
                            raise ModelCallFailed(
                                f"HTTP {resp.status} after {attempt} retries: {text[:200]}"
                            )
                        await asyncio.sleep(wait)
                        delay = min(delay * 2, MAX_BACKOFF_S)
                        continue
                    if resp.status >= 400:
                        raise ModelCallFailed(f"HTTP {resp.status}: {(await resp.text())[:500]}")
                    return await _read_stream(ctx, resp, turn)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                if attempt == MAX_RETRIES:
                    raise ModelCallFailed(f"{config.base_url} unreachable: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
    raise AssertionError("unreachable")


def _retry_after(header: str | None, default_s: float) -> float:
    try:
        return min(max(float(header), 0.0), MAX_BACKOFF_S) if header else default_s
    except ValueError:
        return default_s


async def _read_stream(ctx: RunContext, resp: aiohttp.ClientResponse, turn: int) -> dict[str, Any]:
    """Assemble a streamed completion: content, tool calls (by index) and usage."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] = {}
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                content.append(delta["content"])
                ctx.emit("token", {"turn": turn, "text": delta["content"]})
            for part in delta.get("tool_calls") or []:
                call = calls.setdefault(
                    part.get("index", 0),
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                call["id"] = part.get("id") or call["id"]
                fn = part.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"message": message, "usage": usage}


# -- built-in tools ------------------------------------------------------------

_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


@tool(
    "calculator",
    "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
    {
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
)
def calculator(expression: str) -> float | int:
    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            if isinstance(node.op, ast.Pow) and abs(walk(node.right)) > 100:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    return walk(ast.parse(expression, mode="eval"))


@tool(
    "word_count",
    "Count the words in a text.",
    {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
)
def word_count(text: str) -> int:
    return len(text.split())
