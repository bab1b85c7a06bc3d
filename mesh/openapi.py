"""The OpenAPI 3.1 document of the HTTP API, generated from mesh.schemas.

The paths are the routes the application really serves (read from its router
at request time, so membership routes added later are listed too); the request
and response bodies are the msgspec types the API validates with.
"""

from collections.abc import Iterable
from typing import Any

import msgspec

from raftmesh.consensus.waits import SIGNAL_NAME
from raftmesh.mesh.schemas import (
    MAX_EVENT_SEQ,
    SIGNAL_NAME_RULE,
    ErrorResponse,
    JoinRequest,
    JoinResponse,
    RunList,
    RunView,
    ScheduleList,
    ScheduleRequest,
    ScheduleView,
    SignalRequest,
    SignalResponse,
    SubmitRequest,
    SubmitResponse,
)

REF = "#/components/schemas/{name}"
_SCHEMAS = (
    SubmitRequest,
    SubmitResponse,
    SignalRequest,
    SignalResponse,
    RunView,
    RunList,
    JoinRequest,
    JoinResponse,
    ErrorResponse,
    ScheduleRequest,
    ScheduleView,
    ScheduleList,
)

# (method, path) -> summary, request body type, {status: (response type, description)}
_Operation = tuple[str, type | None, dict[str, tuple[type | None, str]]]
OPERATIONS: dict[tuple[str, str], _Operation] = {
    ("POST", "/v1/runs"): (
        "Submit a run",
        SubmitRequest,
        {
            "202": (SubmitResponse, "queued"),
            "200": (SubmitResponse, "a run with this idempotency key exists"),
        },
    ),
    ("GET", "/v1/runs"): ("List runs, newest first", None, {"200": (RunList, "runs")}),
    ("GET", "/v1/runs/{id}"): ("One run", None, {"200": (RunView, "the run")}),
    ("POST", "/v1/runs/{id}/cancel"): (
        "Cancel a run and its descendants",
        None,
        {"202": (None, "cancelling")},
    ),
    ("POST", "/v1/runs/{id}/retry"): ("Re-queue a dead letter", None, {"202": (None, "queued")}),
    ("POST", "/v1/runs/{id}/pause"): (
        "Pause a run: queued or waiting at once, running at its next step boundary",
        None,
        {"202": (RunView, "paused, or running with pause_requested until its owner lets go")},
    ),
    ("POST", "/v1/runs/{id}/resume"): (
        "Resume a paused run (back to the queue), or withdraw a pending pause",
        None,
        {"202": (RunView, "queued, or running with the pause withdrawn")},
    ),
    ("GET", "/v1/runs/{id}/events"): (
        "The run's events as Server-Sent Events; resume with Last-Event-ID",
        None,
        {"200": (None, "text/event-stream")},
    ),
    ("POST", "/v1/runs/{id}/signals/{name}"): (
        "Send a run a signal; its wait_for_signal(name) returns the data",
        SignalRequest,
        {"202": (SignalResponse, "stored and announced")},
    ),
    ("GET", "/v1/agents"): ("Agents this peer runs", None, {"200": (None, "agents")}),
    ("GET", "/v1/cluster"): ("Peers, leader, queue and slots", None, {"200": (None, "the mesh")}),
    ("GET", "/v1/openapi.json"): ("This document", None, {"200": (None, "OpenAPI 3.1")}),
    ("GET", "/healthz"): ("Liveness of this process", None, {"200": (None, "alive")}),
    ("GET", "/readyz"): (
        "Readiness: leader known, registered, storage reachable",
        None,
        {"200": (None, "ready")},
    ),
    ("GET", "/metrics"): ("Prometheus metrics", None, {"200": (None, "text exposition format")}),
    ("POST", "/v1/peers"): ("Admit a new peer", JoinRequest, {"200": (JoinResponse, "reserved")}),
    ("GET", "/v1/peers/{id}"): ("One peer (admin)", None, {"200": (None, "the peer")}),
    ("POST", "/v1/peers/{id}/drain"): ("Drain a peer (admin)", None, {"200": (None, "draining")}),
    ("POST", "/v1/peers/{id}/undrain"): ("Undrain a peer (admin)", None, {"200": (None, "up")}),
    ("POST", "/v1/peers/{id}/leave"): ("Remove a peer (admin)", None, {"200": (None, "left")}),
    ("GET", "/v1/runs/{id}/steps"): (
        "The run's step journal and who ran it",
        None,
        {"200": (None, "steps and owners")},
    ),
    ("GET", "/v1/diagnostics"): ("This peer's checks (admin)", None, {"200": (None, "checks")}),
    ("GET", "/v1/whoami"): (
        "The caller's token: admin, or the tenant it acts as",
        None,
        {"200": (None, "admin and tenant")},
    ),
    ("POST", "/v1/schedules"): (
        "Create a schedule (replicated; the leader fires each tick once)",
        ScheduleRequest,
        {
            "201": (ScheduleView, "created"),
            "200": (ScheduleView, "a schedule with this id and definition exists"),
        },
    ),
    ("GET", "/v1/schedules"): ("List schedules", None, {"200": (ScheduleList, "schedules")}),
    ("GET", "/v1/schedules/{id}"): ("One schedule", None, {"200": (ScheduleView, "the schedule")}),
    ("DELETE", "/v1/schedules/{id}"): (
        "Delete a schedule (runs it started go on)",
        None,
        {"200": (ScheduleView, "deleted")},
    ),
    ("POST", "/v1/schedules/{id}/pause"): (
        "Pause a schedule: no tick fires until it is resumed",
        None,
        {"200": (ScheduleView, "paused")},
    ),
    ("POST", "/v1/schedules/{id}/resume"): (
        "Resume a schedule; ticks due while it was paused are not fired",
        None,
        {"200": (ScheduleView, "resumed")},
    ),
    ("POST", "/internal/v1/heartbeat"): ("Internal", None, {"200": (None, "heard")}),
    ("POST", "/internal/v1/voters/remove"): ("Internal", None, {"200": (None, "removed")}),
    ("POST", "/internal/v1/voters/promote"): ("Internal", None, {"200": (None, "promoted")}),
}

_PARAMETERS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("POST", "/v1/runs/{id}/signals/{name}"): [
        {
            "name": "name",
            "in": "path",
            "required": True,
            "description": SIGNAL_NAME_RULE,
            "schema": {"type": "string", "pattern": f"^{SIGNAL_NAME.pattern}$"},
        }
    ],
    ("GET", "/v1/runs"): [
        {"name": "status", "in": "query", "schema": {"type": "string"}},
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 100},
        },
        {
            "name": "offset",
            "in": "query",
            "schema": {"type": "integer", "minimum": 0, "maximum": 1_000_000, "default": 0},
        },
        {"name": "tenant", "in": "query", "schema": {"type": "string"}},
        {"name": "agent", "in": "query", "schema": {"type": "string"}},
    ],
    ("GET", "/v1/runs/{id}/events"): [
        {
            "name": "Last-Event-ID",
            "in": "header",
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_SEQ},
        },
        {
            "name": "after",
            "in": "query",
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_SEQ},
        },
    ],
}


def _json(kind: type) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(name=kind.__name__)}}}


def _operation(method: str, path: str) -> dict[str, Any]:
    summary, body, responses = OPERATIONS.get((method, path), (path, None, {}))
    op: dict[str, Any] = {"summary": summary, "responses": {}}
    for status, (kind, description) in responses.items():
        op["responses"][status] = {"description": description}
        if kind is not None:
            op["responses"][status]["content"] = _json(kind)
    op["responses"]["default"] = {
        "description": "an error: 4xx for the request, 5xx for the mesh",
        "content": _json(ErrorResponse),
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(body)}
    params = list(_PARAMETERS.get((method, path), []))
    declared = {p["name"] for p in params if p["in"] == "path"}
    params += [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _path_names(path)
        if name not in declared
    ]
    if params:
        op["parameters"] = params
    if (method, path) in OPEN_ROUTES:
        op["security"] = []
    return op


# Every route takes `Authorization: Bearer <token>` when the peer has tokens
# set (a tenant's, the admin's, or the mesh's internal one for peer routes),
# except probes and this document, which a load balancer or a client reads
# before it has any token.
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "an API token (tenant or admin); peer-to-peer routes take the mesh's",
    }
}
OPEN_ROUTES = frozenset({("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/v1/openapi.json")})


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def openapi_document(routes: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``routes``: (method, path) pairs the application serves."""
    _, components = msgspec.json.schema_components(_SCHEMAS, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for method, path in sorted(routes, key=lambda r: (r[1], r[0])):
        # The web UI's pages and files are not the API.
        if method in ("HEAD", "*") or path == "/ui" or path.startswith("/ui/"):
            continue
        paths.setdefault(path, {})[method.lower()] = _operation(method, path)
    return {
        "openapi": "3.1.0",
        "info": {"title": "raftmesh", "version": "1"},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": SECURITY_SCHEMES},
        "security": [{"bearer": []}],
    }
