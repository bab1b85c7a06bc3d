"""The built-in ``chat`` agent: any OpenAI-compatible /v1/chat/completions server.

Works with hosted APIs and self-hosted servers alike (vLLM, Ollama, llama.cpp).
The endpoints are named in the peer's settings (``[models.NAME]``: ``base_url``,
``model``, ``api_key_env``; ``MESH_CHAT_*`` define the one named "default") and
reach the agent as ``ctx.models``. An input may only choose one by name
(``"model": "NAME"``); it never carries a URL or a key, so a submitter can
neither point the peer's key at an address of their own nor make the peer fetch
one. The key is read from the environment variable the endpoint names, and is
sent only with requests to that endpoint's base_url (redirects are not
followed). What a server answers reaches errors and events only as a short
excerpt with anything key-like blanked out.

Every model call and every tool call is a journaled step: a run resumed on
another peer replays finished calls from the journal and does not pay for them
twice. Tokens stream to watchers as ``token`` events while a call runs. 429 and
5xx answers are retried with exponential backoff (honouring ``Retry-After``).
Each request (a retry too) first waits for capacity of the endpoint's
mesh-wide rate limit (its ``rate_limit`` setting; ``ctx.limit``). Each call is
charged to the run's budget (``model_calls`` and ``tokens``), so a parent's
budget bounds a whole tree of chat agents. Tools run off the event
loop (sync ones in a thread) under a time limit, so a slow tool cannot stall
the peer; the built-in calculator also bounds the size of what it computes.
A tool registered with ``requires_approval`` runs only once a person says so:
the run asks (an ``approval.requested`` event), waits for a ``decision`` signal
without holding a slot, and on a denial the model is told so instead.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import inspect
import json
import operator
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp

from raftmesh.runner.agents.builtin import APPROVAL_REQUESTED, APPROVAL_SIGNAL
from raftmesh.runner.context import RunContext, RunError
from raftmesh.runner.models import DEFAULT_MODEL, ModelEndpoint
from raftmesh.runner.registry import InvalidInput, agent

MAX_TURNS = 8
MAX_RETRIES = 6
BACKOFF_S = 0.25
MAX_BACKOFF_S = 8.0
REQUEST_TIMEOUT_S = 300.0
TOOL_TIMEOUT_S = 10.0
# How much of a server's answer may appear in an error or an event, and how
# much of it is read at all to find that much.
EXCERPT_CHARS = 80
_EXCERPT_READ_BYTES = 4096

# Sync tools run here, not in the loop's default executor, which aiohttp needs
# for DNS: a tool that never returns then holds one of these threads only.
_TOOL_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="chat-tool")

_SECRET_LIKE = re.compile(
    r"(?i)((?:api[_-]?key|token|secret|password|authorization)[\"']?\s*[:=]\s*[\"']?"
    r"(?:bearer\s+)?|bearer\s+)[^\s\"',;}]+"
    r"|\b(?:sk|pk|rk|ghp|gho|ghs|xox[abpr])[-_][A-Za-z0-9_-]{6,}"
    r"|[A-Za-z0-9+/_-]{32,}={0,2}"
)


class ModelCallFailed(Exception):
    """The endpoint kept failing (or refused the request) after every retry."""


class ChatConfigError(RunError):
    """The run cannot call a model: the input names no configured endpoint."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    timeout_s: float = TOOL_TIMEOUT_S
    requires_approval: bool = False

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
    name: str,
    description: str,
    parameters: dict[str, Any],
    *,
    timeout_s: float = TOOL_TIMEOUT_S,
    requires_approval: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a Python function (sync or async, keyword arguments) as a tool
    the ``chat`` agent can offer the model; ``parameters`` is its JSON schema.
    A call still running after ``timeout_s`` answers the model with an error.
    ``requires_approval``: each call waits for a person's ``decision`` signal
    first (for tools with effects outside the run: mail, payments, deletes)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in TOOLS and TOOLS[name].fn is not fn:
            raise ValueError(f"tool {name!r} is registered twice")
        TOOLS[name] = Tool(name, description, parameters, fn, timeout_s, requires_approval)
        return fn

    return register


def choose_endpoint(input: Any, models: Mapping[str, ModelEndpoint]) -> ModelEndpoint:
    """The configured endpoint the input names (``model``, else "default")."""
    if not isinstance(input, dict):
        raise ChatConfigError("chat input must be an object with a prompt or messages")
    choices = ", ".join(sorted(models)) or "none"
    if "base_url" in input:
        raise ChatConfigError(
            "chat input may not carry base_url: endpoints are named in the peers' settings "
            f'([models.NAME]); choose one with "model": configured models: {choices}'
        )
    name = input.get("model", DEFAULT_MODEL)
    if not isinstance(name, str) or name not in models:
        if not models:
            raise ChatConfigError(
                "no model endpoints are configured on this peer: add [models.NAME] tables "
                "to its settings, or set MESH_CHAT_BASE_URL and MESH_CHAT_MODEL"
            )
        raise ChatConfigError(f"unknown model {name!r}; configured models: {choices}")
    return models[name]


def chosen_tools(input: dict[str, Any]) -> list[Tool]:
    unknown = [name for name in input.get("tools", []) if name not in TOOLS]
    if unknown:
        raise ChatConfigError(f"unknown tools {unknown}; registered: {sorted(TOOLS)}")
    return [TOOLS[name] for name in input.get("tools", [])]


def check_chat_input(input: Any, models: Mapping[str, ModelEndpoint]) -> None:
    try:
        choose_endpoint(input, models)
        chosen_tools(input)
    except ChatConfigError as exc:
        raise InvalidInput(str(exc)) from None


@agent("chat", check=check_chat_input)
async def chat(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    """Input: ``prompt`` (or ``messages``), optional ``system``, ``tools`` (names
    of registered tools), ``model`` (a configured endpoint's name), ``max_turns``,
    ``temperature``. Result: the final ``answer``, the whole ``messages`` list
    and ``usage``."""
    endpoint = choose_endpoint(input, ctx.models)
    messages: list[dict[str, Any]] = list(input.get("messages") or [])
    if input.get("system"):
        messages.insert(0, {"role": "system", "content": input["system"]})
    if input.get("prompt"):
        messages.append({"role": "user", "content": input["prompt"]})
    tools = chosen_tools(input)
    options = {"temperature": input["temperature"]} if "temperature" in input else {}
    for turn in range(int(input.get("max_turns", MAX_TURNS))):
        ctx.require(model_calls=1)
        reply = await ctx.step(
            "model", _complete, ctx, endpoint, messages, [t.spec() for t in tools], options, turn
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
            denial = await _approve(ctx, call) if _requires_approval(fn["name"]) else None
            if denial is None:
                output = await ctx.step(
                    f"tool:{fn['name']}", _run_tool, ctx, fn["name"], fn["arguments"]
                )
            else:
                output = denial
            ctx.emit("tool", {"name": fn["name"], "output": output})
            messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(output)}
            )
    raise ModelCallFailed(f"no final answer after {input.get('max_turns', MAX_TURNS)} turns")


def _requires_approval(name: str) -> bool:
    found = TOOLS.get(name)
    return found is not None and found.requires_approval


async def _approve(ctx: RunContext, call: dict[str, Any]) -> str | None:
    """Ask for the call and wait for the next ``decision`` signal: None when
    approved, else what the model is told instead of the tool's answer. Both
    the event and the wait are journaled (ctx.emit, ctx.wait_for_signal), so a
    replay neither asks again nor takes another signal's decision; the decision
    is read from the journaled data, so the replay decides the same."""
    fn = call["function"]
    ctx.emit(
        APPROVAL_REQUESTED,
        {"tool": fn["name"], "arguments": _arguments(fn["arguments"]), "call_id": call["id"]},
    )
    approved, note = read_decision(await ctx.wait_for_signal(APPROVAL_SIGNAL))
    if approved:
        return None
    said = f": {note}" if note else " (no note given)"
    return f"denied: the call of {fn['name']} was not run; the approver said{said}"


def _arguments(arguments: str) -> Any:
    """The call's arguments as the approver should read them: the JSON the
    model sent, parsed, or the text itself if it is not JSON."""
    try:
        return json.loads(arguments or "{}")
    except ValueError:
        return arguments


def read_decision(data: Any) -> tuple[bool, str]:
    """``(approve, note)`` from a decision signal's data, which anyone who may
    signal the run writes: anything but ``{"approve": bool, "note"?: str}``
    is a denial whose note says what was wrong, never a crash of the run.
    Other fields (who decided, when) are the approver's own and pass."""
    if not isinstance(data, dict) or not isinstance(data.get("approve"), bool):
        return False, (
            'the decision was not {"approve": true|false, "note"?: text}; '
            f"got {excerpt(json.dumps(data, default=str))}"
        )
    # null, as JSON clients send an absent field, is no note
    note = "" if data.get("note") is None else data["note"]
    if not isinstance(note, str):
        return (
            False,
            f"the decision's note must be text, got {excerpt(json.dumps(note, default=str))}",
        )
    return data["approve"], note


async def _run_tool(ctx: RunContext, name: str, arguments: str) -> Any:
    """A tool's answer, or its error as the model should see it (it may retry)."""
    with ctx.span("raftmesh.chat.tool", tool=name):
        return await _call_tool(name, arguments)


async def _call_tool(name: str, arguments: str) -> Any:
    try:
        kwargs = json.loads(arguments or "{}")
        found = TOOLS[name]
        async with asyncio.timeout(found.timeout_s):
            if inspect.iscoroutinefunction(found.fn):
                return await found.fn(**kwargs)
            loop = asyncio.get_running_loop()
            call = functools.partial(found.fn, **kwargs)
            value = await loop.run_in_executor(_TOOL_THREADS, call)
            if inspect.isawaitable(value):
                value = await value
            return value
    except TimeoutError:
        return {"error": f"tool {name} did not answer within {found.timeout_s}s"}
    except Exception as exc:  # reported to the model, which decides what to do next
        return {"error": f"{type(exc).__name__}: {exc}"}


def excerpt(text: str, secrets: tuple[str, ...] = ()) -> str:
    """At most EXCERPT_CHARS of a server's answer, on one line, with the given
    secrets and anything that looks like a key or token blanked out (before
    cutting, so no prefix of one survives the cut)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = " ".join(text.split())
    text = _SECRET_LIKE.sub(lambda m: (m.group(1) or "") + "[redacted]", text)
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"


async def _body_excerpt(resp: aiohttp.ClientResponse, key: str | None) -> str:
    raw = await resp.content.read(_EXCERPT_READ_BYTES)
    return excerpt(raw.decode(errors="replace"), (key,) if key else ())


def api_key(endpoint: ModelEndpoint) -> str | None:
    if not endpoint.api_key_env:
        return None
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise ChatConfigError(
            f"the key of model endpoint {endpoint.base_url} is read from "
            f"{endpoint.api_key_env}, which is not set on this peer"
        )
    return key


async def _complete(
    ctx: RunContext,
    endpoint: ModelEndpoint,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    options: dict[str, Any],
    turn: int,
) -> dict[str, Any]:
    """One model call, streamed, retried on 429/5xx and connection errors; its
    span holds every HTTP try (the aiohttp client instrumentation's spans)."""
    with ctx.span("raftmesh.chat.model", model=endpoint.model, turn=turn):
        return await _call_model(ctx, endpoint, messages, tools, options, turn)


async def _call_model(
    ctx: RunContext,
    endpoint: ModelEndpoint,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    options: dict[str, Any],
    turn: int,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": endpoint.model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        **options,
    }
    if tools:
        body["tools"] = tools
    key = api_key(endpoint)
    # On the one request to the configured URL, never on the session, and
    # with redirects refused: the key goes nowhere else.
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    delay = BACKOFF_S
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for attempt in range(MAX_RETRIES + 1):
            try:
                async with (
                    model_capacity(ctx, endpoint.rate_limit, estimate_tokens(messages)),
                    http.post(
                        endpoint.chat_url, json=body, headers=headers, allow_redirects=False
                    ) as resp,
                ):
                    if resp.status == 429 or resp.status >= 500:
                        text = await _body_excerpt(resp, key)
                        wait = _retry_after(resp.headers.get("Retry-After"), delay)
                        ctx.emit(
                            "model.retry",
                            {"turn": turn, "status": resp.status, "wait_s": wait, "body": text},
                        )
                        if attempt == MAX_RETRIES:
                            raise ModelCallFailed(
                                f"HTTP {resp.status} after {attempt} retries: {text}"
                            )
                    elif 300 <= resp.status < 400:
                        raise ModelCallFailed(
                            f"HTTP {resp.status} from {endpoint.chat_url}: redirects are not "
                            "followed; configure the URL the server redirects to"
                        )
                    elif resp.status >= 400:
                        text = await _body_excerpt(resp, key)
                        raise ModelCallFailed(f"HTTP {resp.status}: {text}")
                    else:
                        return await _read_stream(ctx, resp, turn)
                # Backing off outside the block: a waiting retry holds no
                # concurrent call of the rate limit, nor the connection.
                await asyncio.sleep(wait)
                delay = min(delay * 2, MAX_BACKOFF_S)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                if attempt == MAX_RETRIES:
                    raise ModelCallFailed(f"{endpoint.base_url} unreachable: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
    raise AssertionError("unreachable")


def model_capacity(
    ctx: RunContext, rate_limit: str, tokens: int
) -> contextlib.AbstractAsyncContextManager[Any]:
    """Capacity of an endpoint's mesh-wide rate limit ("" for none) for one
    request of about ``tokens`` tokens; a retry is a request of its own."""
    if not rate_limit:
        return contextlib.nullcontext()
    return ctx.limit(rate_limit, tokens=tokens)


def estimate_tokens(prompt: Any) -> int:
    """What a request costs a tokens-per-minute limit, known before it is sent:
    its prompt at about four characters a token (the answer is not known yet)."""
    return 1 + len(json.dumps(prompt, default=str)) // 4


def _retry_after(header: str | None, default_s: float) -> float:
    try:
        return min(max(float(header), 0.0), MAX_BACKOFF_S) if header else default_s
    except ValueError:
        return default_s


# A model streams a token or two per chunk: one stored event each would cost a
# write per token and use up the run's event limit. Watchers get the text in
# batches of at most this many characters or this much delay instead.
TOKEN_BATCH_CHARS = 200
TOKEN_BATCH_S = 0.25


class TokenBatch:
    """Coalesces streamed text into ``token`` events."""

    def __init__(self, ctx: RunContext, turn: int) -> None:
        self._ctx = ctx
        self._turn = turn
        self._parts: list[str] = []
        self._size = 0
        self._since = 0.0

    def add(self, text: str) -> None:
        if not self._parts:
            self._since = time.monotonic()
        self._parts.append(text)
        self._size += len(text)
        if self._size >= TOKEN_BATCH_CHARS or time.monotonic() - self._since >= TOKEN_BATCH_S:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._ctx.emit("token", {"turn": self._turn, "text": "".join(self._parts)})
            self._parts, self._size = [], 0


async def _read_stream(ctx: RunContext, resp: aiohttp.ClientResponse, turn: int) -> dict[str, Any]:
    """Assemble a streamed completion: content, tool calls (by index) and usage."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] = {}
    pending = TokenBatch(ctx, turn)
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
                pending.add(delta["content"])
            for part in delta.get("tool_calls") or []:
                call = calls.setdefault(
                    part.get("index", 0),
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                call["id"] = part.get("id") or call["id"]
                fn = part.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
    pending.flush()
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


# A model at any URL can ask for any expression: bound what one may cost.
MAX_EXPRESSION_CHARS = 1000
MAX_EXPONENT = 100
MAX_INT_BITS = 4096


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
    """Every intermediate integer stays within MAX_INT_BITS, checked before a
    power or product is computed: one big-integer operation holds the GIL for
    its whole length, so no thread or timeout could stop it once started."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return _bounded(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow):
                _check_power(left, right)
            if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise ValueError(f"product larger than {MAX_INT_BITS} bits")
            return _bounded(_OPERATORS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _bounded(_OPERATORS[type(node.op)](walk(node.operand)))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    return walk(ast.parse(expression, mode="eval"))


def _check_power(base: Any, exponent: Any) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent larger than {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if base.bit_length() * exponent > MAX_INT_BITS:
            raise ValueError(f"power larger than {MAX_INT_BITS} bits")


def _bounded(value: Any) -> Any:
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"result larger than {MAX_INT_BITS} bits")
    return value


@tool(
    "word_count",
    "Count the words in a text.",
    {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
)
def word_count(text: str) -> int:
    return len(text.split())
