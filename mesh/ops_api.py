"""What operators use beyond the run API: diagnostics, a run's step journal, who
a token is, and the web UI (static files shipped in the package, talking to this same API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from raftmesh.mesh import logs
from raftmesh.mesh.api import principal, require_admin
from raftmesh.mesh.auth import Authenticator

UI_DIR = Path(__file__).with_name("ui")


class OpsAPI(Protocol):
    auth: Authenticator

    async def diagnostics(self) -> dict[str, Any]: ...
    async def run_steps(self, run_id: str, tenant: str | None) -> dict[str, Any]: ...


@web.middleware
async def trace_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Log lines written while serving a request carry the caller's trace id."""
    token = logs.trace_id.set(logs.trace_id_from(request.headers.get("traceparent")))
    try:
        return await handler(request)
    finally:
        logs.trace_id.reset(token)


def add_ops_routes(app: web.Application, peer: OpsAPI) -> None:
    app.middlewares.append(trace_middleware)

    async def diagnostics(request: web.Request) -> web.Response:
        require_admin(request)  # the whole mesh's health, every tenant's queue
        return web.json_response(await peer.diagnostics())

    async def whoami(request: web.Request) -> web.Response:
        # The UI asks before it shows the admin pages, so that a tenant's
        # token is not met with a 403 on every refresh.
        who = principal(request)
        return web.json_response({"admin": who.admin, "tenant": who.tenant})

    async def steps(request: web.Request) -> web.Response:
        who = principal(request)
        return web.json_response(await peer.run_steps(request.match_info["id"], who.tenant))

    index = (UI_DIR / "index.html").read_text()
    page = index.replace("{{TOKEN_REQUIRED}}", "0" if peer.auth.open else "1")

    async def ui_index(request: web.Request) -> web.Response:
        # No token here: the page holds no data. It is told whether the API
        # wants one, so it can ask before its first call instead of after a 401.
        return web.Response(
            text=page, content_type="text/html", headers={"Cache-Control": "no-cache"}
        )

    async def ui_redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    app.router.add_get("/v1/whoami", whoami)
    app.router.add_get("/v1/diagnostics", diagnostics)
    app.router.add_get("/v1/runs/{id}/steps", steps)
    app.router.add_get("/ui", ui_redirect)
    app.router.add_get("/ui/", ui_index)
    app.router.add_static("/ui/static", UI_DIR / "static", append_version=False)
