"""Agents every peer has (``chat`` lives in its own module)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from raftmesh.runner.context import RunContext, RunError, SignalTimeout
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.registry import InvalidInput, agent

APPROVAL_SIGNAL = "decision"
APPROVAL_REQUESTED = "approval.requested"
_APPROVAL_FIELDS = {"prompt", "timeout_s"}


@agent("echo")
async def echo(ctx: RunContext, input: Any) -> Any:
    return input


@agent("sleep")
async def sleep(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    seconds = float(input.get("seconds", 1))
    await asyncio.sleep(seconds)
    return {"slept_s": seconds}


class ApprovalTimedOut(RunError):
    """No decision came in time; another attempt would replay the same timeout."""


def check_approval_input(input: Any, models: Mapping[str, ModelEndpoint]) -> None:
    """Refused at submission rather than failed later: a misspelled field
    (``timeout`` for ``timeout_s``) would otherwise wait forever unnoticed."""
    if not isinstance(input, dict) or "prompt" not in input:
        raise InvalidInput('approval input must be an object with a "prompt"')
    unknown = sorted(set(input) - _APPROVAL_FIELDS)
    if unknown:
        raise InvalidInput(
            f"approval input has unknown fields {unknown}; it takes prompt, timeout_s"
        )
    timeout_s = input.get("timeout_s")
    if timeout_s is not None and (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not 0 <= timeout_s < 1e9
    ):
        raise InvalidInput(f"approval timeout_s must be a number of seconds, not {timeout_s!r}")


@agent("approval", check=check_approval_input)
async def approval(ctx: RunContext, input: dict[str, Any]) -> Any:
    """A person's decision as a run: it asks (an ``approval.requested`` event
    with the prompt), waits for signal ``decision`` without a slot, and
    returns that signal's data. A replay finds the event stored at the same
    place and the signal journaled, so it neither asks twice nor waits again."""
    ctx.emit(APPROVAL_REQUESTED, {"prompt": input["prompt"]})
    timeout_s = input.get("timeout_s")
    try:
        return await ctx.wait_for_signal(APPROVAL_SIGNAL, timeout_s)
    except SignalTimeout as exc:
        raise ApprovalTimedOut(f"no {APPROVAL_SIGNAL!r} signal within {timeout_s}s") from exc
