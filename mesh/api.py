"""HTTP routes (contract v1). Errors become responses in one place: the middleware."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from raftmesh.consensus.errors import UnencodableCommand
from raftmesh.mesh.auth import Authenticator, Principal
from raftmesh.mesh.errors import (
    BadRequest,
    Forbidden,
    MalformedJSON,
    MeshError,
    PayloadTooLarge,
    TooManyStreams,
    Unauthorized,
)
from raftmesh.mesh.events import Frame, encode
from raftmesh.mesh.openapi import openapi_document
from raftmesh.mesh.schemas import (
    MAX_EVENT_SEQ,
    SignalRequest,
    SubmitRequest,
    check_nesting,
    nesting_message,
    parse_request,
)

log = logging.getLogger("raftmesh.api")

# What a submission (and a ``ctx.spawn``) may carry: mesh.schemas.SubmitRequest.
SUBMIT_FIELDS = {f.name: f.type for f in msgspec.structs.fields(SubmitRequest)}

MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
AUTH_KEY = web.AppKey("auth", Authenticator)


class PeerAPI(Protocol):
    """What the HTTP layer needs from a peer; it never touches Raft itself."""

    max_body_bytes: int
    auth: Authenticator
    internal_token: str
    # Concurrent event streams this peer serves, in all and per token.
    max_streams: int
    max_streams_per_token: int

    # ``tenant`` None: every tenant (an admin); otherwise another tenant's run
    # is answered as if it did not exist.
    async def submit(self, spec: dict[str, Any]) -> tuple[str, bool]: ...
    async def get_run(self, run_id: str, tenant: str | None) -> dict[str, Any]: ...
    async def list_runs(
        self,
        status: str | None,
        limit: int,
        tenant: str | None = None,
        agent: str | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]: ...
    async def cancel_run(self, run_id: str, tenant: str | None) -> dict[str, Any]: ...
    async def retry_run(self, run_id: str, tenant: str | None) -> dict[str, Any]: ...
    # an operator's pause and resume (issue 11): the run's view after the change
    async def pause_run(self, run_id: str, tenant: str | None) -> dict[str, Any]: ...
    async def resume_run(self, run_id: str, tenant: str | None) -> dict[str, Any]: ...
    def cluster(self) -> dict[str, Any]: ...
    async def readiness(self) -> tuple[bool, str]: ...
    def heartbeat(self, report: dict[str, Any]) -> dict[str, Any]: ...
    def metrics_text(self) -> bytes: ...
    def follow_events(self, run_id: str, after_seq: int) -> AsyncIterator[Frame]: ...
    def agents(self) -> dict[str, Any]: ...
    # a signal to a waiting run (issue 11)
    async def signal(
        self, run_id: str, name: str, data: Any, idempotency_key: str | None, tenant: str | None
    ) -> dict[str, Any]: ...


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
    except UnencodableCommand as exc:
        return error_response(BadRequest(f"the request cannot be replicated: {exc}"))
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


def principal(request: web.Request) -> Principal:
    """Who the request acts as (mesh.auth); 401 without a known token."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    found = request.app[AUTH_KEY].principal(token if scheme.lower() == "bearer" else None)
    if found is None:
        raise Unauthorized("missing or wrong API token: send 'Authorization: Bearer <token>'")
    return found


def require_admin(request: web.Request) -> Principal:
    """Membership changes (join, leave, drain) can cost the mesh its quorum and
    the cluster view and metrics name every tenant, so they take the admin scope."""
    who = principal(request)
    if not who.admin:
        raise Forbidden("this route needs an admin token; a tenant token cannot use it")
    return who


class StreamLimits:
    """Counts open event streams, in all and per token; past a limit a new one is a 429."""

    def __init__(self, max_streams: int, max_per_token: int) -> None:
        self._max = max_streams
        self._max_per_token = max_per_token
        self._open = 0
        self._by_token: dict[str, int] = {}

    def acquire(self, token_key: str) -> None:
        if self._open >= self._max:
            raise TooManyStreams(
                f"this peer already serves {self._max} event streams (max_streams); "
                "close one, or watch through another peer",
                retry_after_s=5,
            )
        if self._by_token.get(token_key, 0) >= self._max_per_token:
            raise TooManyStreams(
                f"this token already holds {self._max_per_token} event streams on this peer "
                "(max_streams_per_token); close one first",
                retry_after_s=5,
            )
        self._open += 1
        self._by_token[token_key] = self._by_token.get(token_key, 0) + 1

    def release(self, token_key: str) -> None:
        self._open -= 1
        left = self._by_token[token_key] - 1
        if left:
            self._by_token[token_key] = left
        else:
            del self._by_token[token_key]


async def _json_body(request: web.Request) -> Any:
    """The decoded body, refused with a 400 if it is not JSON or nests deeper
    than MAX_NESTING (every route reads its body here)."""
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw)
    except RecursionError:
        raise BadRequest(nesting_message()) from None
    except msgspec.ValidationError as exc:  # a number no float or integer holds
        raise BadRequest(f"request body holds a value out of range: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MalformedJSON(f"request body is not valid JSON: {exc}") from exc
    check_nesting(body)
    return body


def validate_submission(body: Any) -> dict[str, Any]:
    """The submission's fields, every one within its bounds (mesh.schemas);
    also the check a ``ctx.spawn`` goes through, hence the nesting check here."""
    check_nesting(body)
    request = parse_request(body, SubmitRequest, _SUBMIT_HINTS)
    return msgspec.structs.asdict(request)


_SUBMIT_HINTS = {
    "agent": "missing field 'agent': name the agent to run",
    "input": "missing field 'input': give the agent's input (any JSON value)",
}


def _event_seq(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or int(raw) > MAX_EVENT_SEQ:
        raise BadRequest(
            f"Last-Event-ID (or ?after=) must be an event sequence number from 0 to "
            f"{MAX_EVENT_SEQ}, got {raw[:40]!r}"
        )
    return int(raw)


def build_app(peer: PeerAPI) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=peer.max_body_bytes)
    app[MAX_BODY_KEY] = peer.max_body_bytes
    app[AUTH_KEY] = peer.auth
    streams = StreamLimits(peer.max_streams, peer.max_streams_per_token)

    async def submit(request: web.Request) -> web.Response:
        who = principal(request)
        spec = validate_submission(await _json_body(request))
        tenant = who.submission_tenant(spec.get("tenant"))
        if tenant is None and who.tenant is not None:
            raise Forbidden(
                f"this token submits as tenant {who.tenant!r}, not {spec['tenant']!r}: "
                "leave 'tenant' out or use a token of that tenant"
            )
        spec["tenant"] = tenant
        run_id, created = await peer.submit(spec)
        return web.json_response(
            {"id": run_id, "status": "queued" if created else "existing"},
            status=202 if created else 200,
        )

    async def get_run(request: web.Request) -> web.Response:
        who = principal(request)
        return web.json_response(await peer.get_run(request.match_info["id"], who.tenant))

    async def list_runs(request: web.Request) -> web.Response:
        who = principal(request)
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
        for name in ("status", "tenant", "agent"):
            if "\x00" in q.get(name, ""):
                # No stored run has one (RunSpec refuses NUL), and PostgreSQL
                # text cannot carry it to the query.
                raise BadRequest(f"query parameter {name!r} must not contain NUL")
        tenant = q.get("tenant") or None
        if who.tenant is not None:
            if tenant not in (None, who.tenant):
                return web.json_response({"runs": []})  # no run of another tenant is visible
            tenant = who.tenant
        runs = await peer.list_runs(
            q.get("status") or None, limit, tenant, q.get("agent") or None, offset
        )
        return web.json_response({"runs": runs})

    def run_action(
        act: Callable[[str, str | None], Awaitable[dict[str, Any]]],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """POST /v1/runs/{id}/<action>: 202 with the run's view, as the caller's tenant."""

        async def handle(request: web.Request) -> web.Response:
            who = principal(request)
            return web.json_response(await act(request.match_info["id"], who.tenant), status=202)

        return handle

    async def cluster(request: web.Request) -> web.Response:
        require_admin(request)
        return web.json_response(peer.cluster())

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(request: web.Request) -> web.Response:
        ready, reason = await peer.readiness()
        return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        require_admin(request)  # the series name tenants
        return web.Response(body=peer.metrics_text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def heartbeat(request: web.Request) -> web.Response:
        _check_token(request, peer.internal_token, "internal")
        report = await _json_body(request)
        if not isinstance(report, dict):
            raise BadRequest("heartbeat body must be a JSON object")
        leases = peer.heartbeat(report)
        # The leader's clock, so the reporting peer can tell its own skew.
        return web.json_response({"ok": True, "wall_ms": int(time.time() * 1000), **leases})

    async def events(request: web.Request) -> web.StreamResponse:
        who = principal(request)
        run_id = request.match_info["id"]
        after = _event_seq(
            request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
        )
        await peer.get_run(run_id, who.tenant)  # 404 before the stream starts
        streams.acquire(who.key)
        try:
            return await _stream(request, run_id, after)
        finally:
            streams.release(who.key)

    async def _stream(request: web.Request, run_id: str, after: int) -> web.StreamResponse:
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

    async def signal(request: web.Request) -> web.Response:
        """202 once the signal is stored and its announcement committed."""
        who = principal(request)
        body = parse_request(await _json_body(request), SignalRequest)
        run_id, name = request.match_info["id"], request.match_info["name"]
        sent = await peer.signal(run_id, name, body.data, body.idempotency_key, who.tenant)
        return web.json_response(sent, status=202)

    async def agents(request: web.Request) -> web.Response:
        principal(request)
        return web.json_response(peer.agents())

    async def openapi(request: web.Request) -> web.Response:
        routes = [
            (r.method, r.resource.canonical) for r in request.app.router.routes() if r.resource
        ]
        return web.json_response(openapi_document(routes))

    app.router.add_post("/v1/runs", submit)
    app.router.add_get("/v1/runs/{id}/events", events)
    app.router.add_post("/v1/runs/{id}/signals/{name}", signal)
    app.router.add_get("/v1/agents", agents)
    app.router.add_get("/v1/runs", list_runs)
    app.router.add_get("/v1/runs/{id}", get_run)
    app.router.add_post("/v1/runs/{id}/cancel", run_action(peer.cancel_run))
    app.router.add_post("/v1/runs/{id}/retry", run_action(peer.retry_run))
    app.router.add_post("/v1/runs/{id}/pause", run_action(peer.pause_run))
    app.router.add_post("/v1/runs/{id}/resume", run_action(peer.resume_run))
    app.router.add_get("/v1/cluster", cluster)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_post("/internal/v1/heartbeat", heartbeat)
    return app
