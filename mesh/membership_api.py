"""HTTP routes for membership operations (join, drain, undrain, leave).

Admin operations: changing the membership can cost the mesh its quorum, so
join, drain, undrain and leave take the admin scope (``require_admin``), and so
does reading a peer (it shows the cluster's layout). Errors go through api.py's middleware.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from raftmesh.mesh.api import _check_token, _json_body, require_admin
from raftmesh.mesh.errors import BadRequest


class MembershipOps(Protocol):
    async def join(self, body: Any) -> dict[str, Any]: ...
    async def drain(self, peer_id: str, mode: str) -> dict[str, Any]: ...
    async def leave(self, peer_id: str, release: bool) -> dict[str, Any]: ...
    async def remove_voter(self, body: Any) -> None: ...
    async def promote(self, body: Any) -> dict[str, Any]: ...
    def describe(self, peer_id: str) -> dict[str, Any]: ...


class MembershipPeer(Protocol):
    internal_token: str

    @property
    def membership(self) -> MembershipOps: ...


async def _release_flag(request: web.Request) -> bool:
    if not request.can_read_body:
        return False
    body = await _json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("release", False), bool):
        raise BadRequest('body must be {"release": true|false}')
    return bool(body.get("release", False))


def add_membership_routes(app: web.Application, peer: MembershipPeer) -> None:
    ops = peer.membership

    async def join(request: web.Request) -> web.Response:
        require_admin(request)
        return web.json_response(await ops.join(await _json_body(request)))

    async def show(request: web.Request) -> web.Response:
        require_admin(request)
        return web.json_response(ops.describe(request.match_info["id"]))

    async def drain(request: web.Request) -> web.Response:
        require_admin(request)
        mode = "release" if await _release_flag(request) else "finish"
        return web.json_response(await ops.drain(request.match_info["id"], mode))

    async def undrain(request: web.Request) -> web.Response:
        require_admin(request)
        return web.json_response(await ops.drain(request.match_info["id"], ""))

    async def leave(request: web.Request) -> web.Response:
        require_admin(request)
        release = await _release_flag(request)
        return web.json_response(await ops.leave(request.match_info["id"], release))

    async def remove_voter(request: web.Request) -> web.Response:
        _check_token(request, peer.internal_token, "internal")
        await ops.remove_voter(await _json_body(request))
        return web.json_response({"ok": True})

    async def promote(request: web.Request) -> web.Response:
        _check_token(request, peer.internal_token, "internal")
        return web.json_response(await ops.promote(await _json_body(request)))

    app.router.add_post("/v1/peers", join)
    app.router.add_get("/v1/peers/{id}", show)
    app.router.add_post("/v1/peers/{id}/drain", drain)
    app.router.add_post("/v1/peers/{id}/undrain", undrain)
    app.router.add_post("/v1/peers/{id}/leave", leave)
    app.router.add_post("/internal/v1/voters/remove", remove_voter)
    app.router.add_post("/internal/v1/voters/promote", promote)
