"""HTTP routes (contract v1). Errors become responses in one place: the middleware."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from raftmesh.mesh.errors import BadRequest, MalformedJSON, MeshError, PayloadTooLarge, Unauthorized
from raftmesh.mesh.events import Frame, encode
from raftmesh.mesh.scheduler import PLACEMENTS
from raftmesh.runner.context import BUDGET_KEYS
from raftmesh.runner.isolation import ISOLATION_MODES

log = logging.getLogger("raftmesh.api")

SUBMIT_FIELDS = {
    "agent": str,
    "input": object,
    "idempotency_key": str,
    "tenant": str,
    "priority": int,
    "labels": dict,
    "timeout_s": (int, float),
    "max_attempts": int,
    "budget": dict,
    "isolation": str,
    "memory_limit_mb": int,
    "session": str,
    "placement": str,
}

MAX_BODY_KEY = web.AppKey("max_body_bytes", int)


class PeerAPI(Protocol):
    """What the HTTP layer needs from a peer; it never touches Raft itself."""

    max_body_bytes: int
    api_token: str
    internal_token: str

    async def submit(self, spec: dict[str, Any]) -> tuple[str, bool]: ...
    async def get_run(self, run_id: str) -> dict[str, Any]: ...
    async def list_runs(
        self,
        status: str | None,
        limit: int,
        tenant: str | None = None,
        agent: str | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]: ...
    async def cancel_run(self, run_id: str) -> dict[str, Any]: ...
    async def retry_run(self, run_id: str) -> dict[str, Any]: ...
    def cluster(self) -> dict[str, Any]: ...
    async def readiness(self) -> tuple[bool, str]: ...
    def heartbeat(self, report: dict[str, Any]) -> None: ...
    def metrics_text(self) -> bytes: ...
    def follow_events(self, run_id: str, after_seq: int) -> AsyncIterator[Frame]: ...
    def agents(self) -> dict[str, Any]: ...


def error_response(exc: MeshError) -> web.Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    body = {"error": {"code": exc.code, "message": exc.message}}
    return web.json_response(body, status=exc.status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except MeshError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(
            PayloadTooLarge(
                f"request body exceeds the limit of {request.app[MAX_BODY_KEY]} bytes; "
                "send large inputs by reference or raise max_body_bytes"
            )
        )
    except web.HTTPException as exc:
        if exc.status >= 400:
            code = exc.reason.lower().replace(" ", "_")
            return web.json_response(
                {"error": {"code": code, "message": exc.text or exc.reason}},
                status=exc.status,
            )
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(MeshError("internal error; see the peer's log"))


def _check_token(request: web.Request, expected: str, what: str) -> None:
    if not expected:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized(f"missing or wrong {what} token: send 'Authorization: Bearer <token>'")


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedJSON(f"request body is not valid JSON: {exc}") from exc


def validate_submission(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if "agent" not in body:
        raise BadRequest("missing field 'agent': name the agent to run")
    if "input" not in body:
        raise BadRequest("missing field 'input': give the agent's input (any JSON value)")
    unknown = set(body) - set(SUBMIT_FIELDS)
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    for name, kind in SUBMIT_FIELDS.items():
        value = body.get(name)
        if value is None or kind is object:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "number"
            raise BadRequest(f"field '{name}' must be a {expected}")
    if not body["agent"]:
        raise BadRequest("field 'agent' must not be empty")
    labels = body.get("labels") or {}
    if not all(isinstance(v, str) for v in labels.values()):
        raise BadRequest("field 'labels' must map strings to strings")
    if body.get("timeout_s") is not None and body["timeout_s"] <= 0:
        raise BadRequest("field 'timeout_s' must be positive")
    if body.get("max_attempts") is not None and body["max_attempts"] < 1:
        raise BadRequest("field 'max_attempts' must be at least 1")
    validate_run_options(body)
    if body.get("placement") is not None and body["placement"] not in PLACEMENTS:
        raise BadRequest(f"field 'placement' must be one of {', '.join(PLACEMENTS)}")
    return body


def validate_run_options(body: dict[str, Any]) -> None:
    """Options a submission and a ``ctx.spawn`` share."""
    budget = body.get("budget")
    if budget is not None and not all(
        k in BUDGET_KEYS and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in budget.items()
    ):
        raise BadRequest(f"field 'budget' maps {' or '.join(BUDGET_KEYS)} to non-negative integers")
    isolation = body.get("isolation")
    if isolation is not None and isolation not in ISOLATION_MODES:
        raise BadRequest(f"field 'isolation' must be one of {', '.join(ISOLATION_MODES)}")
    memory_mb = body.get("memory_limit_mb")
    if memory_mb is not None and memory_mb < 16:
        raise BadRequest("field 'memory_limit_mb' must be at least 16")


def build_app(peer: PeerAPI) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=peer.max_body_bytes)
    app[MAX_BODY_KEY] = peer.max_body_bytes

    async def submit(request: web.Request) -> web.Response:
        _check_token(request, peer.api_token, "API")
        spec = validate_submission(await _json_body(request))
        run_id, created = await peer.submit(spec)
        return web.json_response(
            {"id": run_id, "status": "queued" if created else "existing"},
            status=202 if created else 200,
        )

    async def get_run(request: web.Request) -> web.Response:
        _check_token(request, peer.api_token, "API")
        return web.json_response(await peer.get_run(request.match_info["id"]))

    async def list_runs(request: web.Request) -> web.Response:
        _check_token(request, peer.api_token, "API")
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise BadRequest("query parameter 'limit' must be an integer") from None
        if not 1 <= limit <= 10_000:
            raise BadRequest("query parameter 'limit' must be between 1 and 10000")
        try:
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            raise BadRequest("query parameter 'offset' must be an integer") from None
        if not 0 <= offset <= 1_000_000:
            raise BadRequest("query parameter 'offset' must be between 0 and 1000000")
        q = request.query
        runs = await peer.list_runs(
            q.get("status") or None, limit, q.get("tenant") or None, q.get("agent") or None, offset
        )
        return web.json_response({"runs": runs})

    async def cancel_run(request: web.Request) -> web.Response:
        _check_token(request, peer.api_token, "API")
        return web.json_response(await peer.cancel_run(request.match_info["id"]), status=202)

    async def retry_run(request: web.Request) -> web.Response:
        _check_token(request, peer.api_token, "API")
        return web.json_response(await peer.retry_run(request.match_info["id"]), status=202)

    async def cluster(request: web.Request) -> web.Response:
        _check_token(request, peer.api_token, "API")
        return web.json_response(peer.cluster())

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(request: web.Request) -> web.Response:
        ready, reason = await peer.readiness()
        return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=peer.metrics_text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def heartbeat(request: web.Request) -> web.Response:
        _check_token(request, peer.internal_token, "internal")
        peer.heartbeat(await _json_body(request))
        # The leader's clock, so the reporting peer can tell its own skew.
        return web.json_response({"ok": True, "wall_ms": int(time.time() * 1000)})

    async def events(request: web.Request) -> web.StreamResponse:
        _check_token(request, peer.api_token, "API")
        run_id = request.match_info["id"]
        raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
        try:
            after = int(raw)
        except ValueError:
            raise BadRequest(
                f"Last-Event-ID (or ?after=) must be an event sequence number, got {raw!r}"
            ) from None
        if after < 0:
            raise BadRequest("Last-Event-ID (or ?after=) must not be negative")
        await peer.get_run(run_id)  # 404 before the stream starts
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        try:
            async for frame in peer.follow_events(run_id, after):
                await resp.write(encode(frame))
        except (ConnectionResetError, ConnectionError):
            log.debug("event watcher went away", extra={"run_id": run_id})
        return resp

    async def agents(request: web.Request) -> web.Response:
        _check_token(request, peer.api_token, "API")
        return web.json_response(peer.agents())

    app.router.add_post("/v1/runs", submit)
    app.router.add_get("/v1/runs/{id}/events", events)
    app.router.add_get("/v1/agents", agents)
    app.router.add_get("/v1/runs", list_runs)
    app.router.add_get("/v1/runs/{id}", get_run)
    app.router.add_post("/v1/runs/{id}/cancel", cancel_run)
    app.router.add_post("/v1/runs/{id}/retry", retry_run)
    app.router.add_get("/v1/cluster", cluster)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/internal/v1/heartbeat", heartbeat)
    return app
