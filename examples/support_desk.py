"""A tool-using chat agent: a support desk that looks orders up.

``support`` is the built-in ``chat`` agent with two tools of its own
(``order_status`` and ``refund_window``). Each tool call is a journaled step:
a run resumed on another peer does not look the same order up twice, nor ask
the model again for an answer it already gave.

    export MESH_AGENT_MODULES=examples.support_desk
    export MESH_CHAT_BASE_URL=http://127.0.0.1:11434/v1 MESH_CHAT_MODEL=llama3.2
    mesh dev &
    mesh submit support --watch --input '{"prompt": "Where is order A-1002, and can I still return it?"}'
"""

from __future__ import annotations

from typing import Any

from raftmesh.runner.agents.chat import chat, tool
from raftmesh.runner.sdk import RunContext, agent

# Stands in for the order database a real deployment would query.
ORDERS = {
    "A-1001": {"status": "delivered", "delivered_days_ago": 40, "item": "desk lamp"},
    "A-1002": {"status": "in transit", "eta_days": 2, "item": "office chair"},
    "A-1003": {"status": "delivered", "delivered_days_ago": 3, "item": "monitor arm"},
}
RETURN_DAYS = 30


@tool(
    "order_status",
    "Look an order up by its id (like A-1001): status, item, delivery.",
    {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
)
def order_status(order_id: str) -> dict[str, Any]:
    order = ORDERS.get(order_id.strip().upper())
    return {"order_id": order_id, **order} if order else {"error": f"no order {order_id}"}


@tool(
    "refund_window",
    "Whether an order can still be returned, and until when.",
    {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
)
def refund_window(order_id: str) -> dict[str, Any]:
    order = ORDERS.get(order_id.strip().upper())
    if order is None:
        return {"error": f"no order {order_id}"}
    if order["status"] != "delivered":
        return {"returnable": True, "note": f"{RETURN_DAYS} days from delivery"}
    left = RETURN_DAYS - order["delivered_days_ago"]
    return {"returnable": left > 0, "days_left": max(left, 0)}


@agent("support")
async def support(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    return await chat(
        ctx,
        {
            "system": "You are a support agent. Use the tools; never guess order details.",
            "tools": ["order_status", "refund_window"],
            **input,
        },
    )
