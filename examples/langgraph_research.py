"""A LangGraph agent run durably by the mesh's built-in ``langgraph`` agent.

Two nodes: ``model`` (a chat model that may call tools) and ``tools`` (runs
the calls it asked for), in a loop until the model answers. The mesh runs it
with thread_id = the run id and checkpoints in its own storage: kill the peer
running it and another peer continues from the last super-step, without
calling the model again for a step that finished.

The model is the peer's configured OpenAI-compatible endpoint (the ``chat``
agent's ``[models.NAME]`` settings, or ``MESH_CHAT_*``), handed to the nodes as
``config["configurable"]["model_endpoint"]``, and each call holds the
endpoint's mesh-wide rate limit (``model_limit``; none unless the endpoint
names one in ``rate_limit``). Needs ``pip install
'raftmesh[langgraph]' langchain-openai``. E.g. with Ollama:

    export MESH_CHAT_BASE_URL=http://127.0.0.1:11434/v1 MESH_CHAT_MODEL=llama3.2
    mesh dev &
    mesh submit langgraph --watch --input '{"graph": "examples.langgraph_research:graph",
        "input": {"messages": [{"role": "user", "content": "What is 6*7?"}]}}'
"""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from raftmesh.runner.agents.chat import api_key, estimate_tokens


@tool
def calculator(expression: str) -> str:
    """Evaluate a product of integers such as 6*7."""
    product = 1
    for factor in expression.split("*"):
        product *= int(factor)
    return str(product)


@tool
def word_count(text: str) -> str:
    """Count the words of a text."""
    return str(len(text.split()))


TOOLS = [calculator, word_count]


async def model(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
    endpoint = config["configurable"]["model_endpoint"]
    llm = ChatOpenAI(
        base_url=endpoint.base_url,
        model=endpoint.model,
        api_key=api_key(endpoint) or "none",  # type: ignore[arg-type]
        streaming=True,  # tokens reach the run's events as they come
    )
    async with config["configurable"]["model_limit"](tokens=estimate_tokens(state["messages"])):
        reply = await llm.bind_tools(TOOLS).ainvoke(state["messages"], config)
    return {"messages": [reply]}


builder = StateGraph(MessagesState)
builder.add_node("model", model)
builder.add_node("tools", ToolNode(TOOLS))
builder.add_edge(START, "model")
builder.add_conditional_edges("model", tools_condition)
builder.add_edge("tools", "model")
graph = builder.compile()
