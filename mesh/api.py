"""HTTP routes (contract v1). Errors become responses in one place: the middleware."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mesh.errors import BadRequest, MalformedJSON, MeshError, PayloadTooLarge, Unauthorized

log = logging.getLogger("raftmesh.api")

_SUBMIT_FIELDS = {
    "agent": str,
    "input": object,
    "idempotency_key": str,
    "tenant": str,
    "priority": int,
    "labels": dict,
    "timeout_s": (int, float),
    "max_attempts": int,
}

MAX_BODY_KEY = web.AppKey("max_body_bytes", int)


class PeerAPI(Protocol):
    """What the HTTP layer needs from a peer; it never touches Raft itself."""

    max_body_bytes: int
    api_token: str
    internal_token: str

    async def submit(self, spec: dict[str, Any]) -> tuple[str, bool]: ...
    async def get_run(self, run_id: str) -> dict[str, Any]: ...
    async def list_runs(self, status: str | None, limit: int) -> list[dict[str, Any]]: ...
    def cluster(self) -> dict[str, Any]: ...
    async def readiness(self) -> tuple[bool, str]: ...
    def heartbeat(self, report: dict[str, Any]) -> None: ...
    def metrics_text(self) -> bytes: ...


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
    unknown = set(body) - set(_SUBMIT_FIELDS)
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    for name, kind in _SUBMIT_FIELDS.items():
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
    return body


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
        runs = await peer.list_runs(request.query.get("status") or None, limit)
        return web.json_response({"runs": runs})

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
        return web.json_response({"ok": True})

    app.router.add_post("/v1/runs", submit)
    app.router.add_get("/v1/runs", list_runs)
    app.router.add_get("/v1/runs/{id}", get_run)
    app.router.add_get("/v1/cluster", cluster)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/internal/v1/heartbeat", heartbeat)
    return app
