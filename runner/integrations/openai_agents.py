"""OpenAI Agents SDK on the mesh: every model call and tool call is a journaled step.

``durable_run(ctx, agent, input, endpoint)`` runs an ``agents.Agent`` with a
model provider whose models journal each response (``ctx.step``) and with each
function tool wrapped the same way, so a run resumed on another peer replays
the finished model calls and tool calls from storage and calls the model only
for what was not finished. Replay is by position, as for any ``ctx.step``: the
SDK asks for the same calls in the same order as long as the model's journaled
answers are the same, which they are.

The model is the peer's configured endpoint (``[models.NAME]``, the ``chat``
agent's settings), reached through its OpenAI-compatible chat completions API,
streamed; a run's input names an endpoint, never a URL. Each call waits for
capacity of the endpoint's mesh-wide rate limit (its ``rate_limit``) first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from raftmesh.runner.integrations import ExtraMissing, resolve

try:
    from agents import Agent, FunctionTool, RunConfig, Runner, Usage
    from agents.items import ModelResponse, TResponseOutputItem
    from agents.models.interface import Model, ModelProvider
    from agents.models.openai_provider import OpenAIProvider
    from openai.types.responses import ResponseCompletedEvent, ResponseTextDeltaEvent
except ImportError as exc:
    raise ExtraMissing("openai-agents", "openai-agents") from exc

from pydantic import TypeAdapter

from raftmesh.runner.agents.chat import (
    ChatConfigError,
    api_key,
    choose_endpoint,
    estimate_tokens,
    model_capacity,
)
from raftmesh.runner.context import RunContext, RunError
from raftmesh.runner.integrations.inputs import check_agent_input
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.registry import agent

__all__ = ["JournaledModel", "JournaledProvider", "durable_run", "run_openai_agent"]

_OUTPUT_ITEM: TypeAdapter[Any] = TypeAdapter(TResponseOutputItem)


class JournaledModel(Model):
    """A model whose every response is a step of the run: the call is made
    once per run, a resumed attempt gets the stored response back."""

    def __init__(self, ctx: RunContext, inner: Model, rate_limit: str = "") -> None:
        self._ctx = ctx
        self._inner = inner
        self._rate_limit = rate_limit

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        """Charged to the run's budget like a ``chat`` call (``model_calls``,
        ``tokens``); replayed calls are charged again, which rebuilds the spend."""
        self._ctx.require(model_calls=1)
        stored = await self._ctx.step("openai_agents:model", self._call, args, kwargs)
        self._ctx.charge(model_calls=1, tokens=stored["usage"]["total_tokens"])
        return ModelResponse(
            output=[_OUTPUT_ITEM.validate_python(item) for item in stored["output"]],
            usage=Usage(**stored["usage"]),
            response_id=stored["response_id"],
        )

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise RunError(
            "streamed runs (Runner.run_streamed) are not journaled; the mesh runs "
            "agents with Runner.run and streams tokens as run events"
        )

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Streams the call (token deltas become ``messages`` events) and keeps
        the completed response as plain data for the journal."""
        response = None
        # Model.stream_response(system_instructions, input, ...): the input is the prompt.
        prompt = kwargs.get("input", args[1] if len(args) > 1 else args)
        async with model_capacity(self._ctx, self._rate_limit, estimate_tokens(prompt)):
            async for event in self._inner.stream_response(*args, **kwargs):
                if isinstance(event, ResponseTextDeltaEvent):
                    self._ctx.emit("messages", {"content": event.delta})
                elif isinstance(event, ResponseCompletedEvent):
                    response = event.response
        if response is None:
            raise RuntimeError("the model's stream ended without a completed response")
        usage = response.usage
        return {
            "output": [item.model_dump(mode="json") for item in response.output],
            "usage": {
                "requests": 1,
                "input_tokens": usage.input_tokens if usage else 0,
                "output_tokens": usage.output_tokens if usage else 0,
                "total_tokens": usage.total_tokens if usage else 0,
            },
            "response_id": None,
        }


class JournaledProvider(ModelProvider):
    """Every model it hands out journals its responses in ``ctx`` and takes
    capacity of the mesh-wide limit ``rate_limit`` ("" for none) per call."""

    def __init__(self, ctx: RunContext, inner: ModelProvider, rate_limit: str = "") -> None:
        self._ctx = ctx
        self._inner = inner
        self._rate_limit = rate_limit

    def get_model(self, model_name: str | None) -> Model:
        return JournaledModel(self._ctx, self._inner.get_model(model_name), self._rate_limit)


def journaled_tool(ctx: RunContext, tool: FunctionTool) -> FunctionTool:
    """``tool`` whose invocations are steps: a resumed run gets the stored output."""
    invoke = tool.on_invoke_tool

    async def on_invoke_tool(tool_ctx: Any, arguments: str) -> Any:
        output = await ctx.step(f"openai_agents:tool:{tool.name}", invoke, tool_ctx, arguments)
        return output

    return FunctionTool(
        name=tool.name,
        description=tool.description,
        params_json_schema=tool.params_json_schema,
        on_invoke_tool=on_invoke_tool,
        strict_json_schema=tool.strict_json_schema,
        is_enabled=tool.is_enabled,
    )


async def durable_run(
    ctx: RunContext, agent: Agent[Any], input: str, endpoint: ModelEndpoint
) -> Any:
    """Run ``agent`` on ``input`` against ``endpoint``, every call journaled in ``ctx``;
    the final output. Tool outputs must be what msgpack stores (text, numbers, lists, maps)."""
    tools = [journaled_tool(ctx, t) if isinstance(t, FunctionTool) else t for t in agent.tools]
    provider = OpenAIProvider(
        api_key=api_key(endpoint) or "unused",
        base_url=endpoint.base_url,
        use_responses=False,
    )
    config = RunConfig(
        model=endpoint.model,
        model_provider=JournaledProvider(ctx, provider, endpoint.rate_limit),
        tracing_disabled=True,
    )
    result = await Runner.run(agent.clone(tools=tools), input, run_config=config)
    return result.final_output


def load_agent(reference: str) -> Agent[Any]:
    value = resolve(reference)
    if not isinstance(value, Agent):
        raise RunError(f"{reference!r} is a {type(value).__name__}, not an agents.Agent")
    return value


@agent("openai_agent", check=check_agent_input)
async def run_openai_agent(ctx: RunContext, input: dict[str, Any]) -> Any:
    try:
        endpoint = choose_endpoint(input, ctx.models)
    except ChatConfigError as exc:
        raise RunError(str(exc)) from None
    return await durable_run(ctx, load_agent(input["agent"]), input["input"], endpoint)
