"""A researcher that fans out to sub-agents.

``researcher`` asks the model to split a question into sub-questions, runs one
``chat`` child per sub-question in parallel (each a separate run, scheduled on
whichever peer has a free slot, each granted its share of the parent's budget),
then asks the model to write the answer from the children's notes. Every model
call is a journaled step: kill the peer running the researcher and another
peer picks it up without re-asking what was already answered.

Run it in the demo mesh against any OpenAI-compatible server, e.g. Ollama:

    export MESH_AGENT_MODULES=examples.researcher
    export MESH_CHAT_BASE_URL=http://127.0.0.1:11434/v1 MESH_CHAT_MODEL=llama3.2
    mesh dev &
    mesh submit researcher --watch \\
        --input '{"question": "Why do Raft clusters use an odd number of nodes?"}'
"""

from __future__ import annotations

import json
from typing import Any

from raftmesh.runner.agents.chat import chat
from raftmesh.runner.sdk import RunContext, agent

MAX_SUBQUESTIONS = 3
CALLS_PER_CHILD = 2
TOKENS_PER_CHILD = 4000


@agent("researcher")
async def researcher(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    question = input["question"]
    plan = await chat(
        ctx,
        {
            "system": "You plan research. Answer with a JSON list of at most "
            f"{MAX_SUBQUESTIONS} short sub-questions and nothing else.",
            "prompt": question,
        },
    )
    subquestions = _parse_list(plan["answer"])[:MAX_SUBQUESTIONS] or [question]
    ctx.emit("plan", {"subquestions": subquestions})

    grant = {"model_calls": CALLS_PER_CHILD, "tokens": TOKENS_PER_CHILD} if ctx.budget else None
    children = [
        ctx.spawn("chat", {"prompt": q, "system": "Answer in three sentences."}, budget=grant)
        for q in subquestions
    ]
    notes = await ctx.gather(*children)
    ctx.emit("notes", {"count": len(notes)})

    findings = "\n\n".join(
        f"Q: {q}\nA: {note['answer']}" for q, note in zip(subquestions, notes, strict=True)
    )
    final = await chat(
        ctx,
        {
            "system": "Write a short, sourced answer from the research notes.",
            "prompt": f"Question: {question}\n\nNotes:\n{findings}",
        },
    )
    return {"question": question, "answer": final["answer"], "subquestions": subquestions}


def _parse_list(text: str) -> list[str]:
    """Models wrap JSON in prose or code fences; take the first list found."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        return [line.strip("-* ").strip() for line in text.splitlines() if line.strip()]
    try:
        items = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return []
    return [str(item) for item in items if str(item).strip()]
