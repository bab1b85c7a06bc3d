"""A long-running watcher with durable timers: no model needed.

``uptime_watch`` checks a URL ``checks`` times, ``every_s`` apart, and reports
the availability. Each check is a journaled step and each pause a durable
``ctx.sleep``: kill the peer running it and the run continues elsewhere with the
checks already made and without restarting the current pause; watchers see one
``check`` event per check, whichever peer made it.

    export MESH_AGENT_MODULES=examples.uptime_watch
    mesh dev &
    mesh submit uptime_watch --watch \\
        --input '{"url": "http://127.0.0.1:8101/healthz", "checks": 5, "every_s": 2}'
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from raftmesh.runner.sdk import RunContext, agent


async def probe(url: str, timeout_s: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
            http.get(url) as resp,
        ):
            up = resp.status < 500
            status: int | str = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        up, status = False, type(exc).__name__
    return {"up": up, "status": status, "ms": round((time.monotonic() - started) * 1000, 1)}


@agent("uptime_watch")
async def uptime_watch(ctx: RunContext, input: dict[str, Any]) -> dict[str, Any]:
    url = input["url"]
    checks = int(input.get("checks", 5))
    every_s = float(input.get("every_s", 60))
    results = []
    for i in range(checks):
        if i:
            await ctx.sleep(every_s)
        result = await ctx.step("check", probe, url, float(input.get("timeout_s", 5)))
        results.append(result)
        ctx.emit("check", {"n": i + 1, **result})
    up = sum(r["up"] for r in results)
    return {"url": url, "checks": checks, "up": up, "availability": up / checks}
