"""The one internal client: how a peer talks to the current leader.

Internal calls carry a token derived from the cluster secret, and every
connection goes to the dial address of the advertised one (a NAT, or the chaos
harness's proxy), so no caller builds internal URLs of its own.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from raftmesh.consensus.model import Peer
from raftmesh.mesh.errors import NoQuorumError, Unavailable
from raftmesh.mesh.proposer import Proposer
from raftmesh.mesh.settings import Settings
from raftmesh.mesh.tls import client_context


class LeaderLink:
    def __init__(
        self,
        proposer: Proposer,
        internal_token: str,
        settings: Settings,
        timeout_s: float = 1.0,
    ) -> None:
        self._proposer = proposer
        self._token = internal_token
        self._settings = settings
        # With TLS on, every peer is reached over https and checked against the CA.
        connector = aiohttp.TCPConnector(
            ssl=client_context(settings.ca) if settings.tls_cert else False
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
        )

    def url(self, http: str, path: str) -> str:
        """The URL of ``path`` on the peer whose API is advertised at ``http``."""
        return f"{self._settings.http_scheme}://{self._settings.dial_addr(http)}{path}"

    def leader(self) -> Peer | None:
        """The leading peer as the replicated membership knows it."""
        addr = self._proposer.raft.leader_addr
        if addr is None:
            return None
        with self._proposer.read() as state:
            return state.peer_by_raft(addr)

    async def heartbeat(self, report: dict[str, Any]) -> dict[str, Any] | None:
        """The leader's acknowledgement of this peer's report, or None."""
        leader = self.leader()
        if leader is None:
            return None
        status, text = await self._post(leader, "/internal/v1/heartbeat", report, None)
        if status != 200:
            return None
        try:
            ack = json.loads(text)
        except ValueError:
            return {}
        return ack if isinstance(ack, dict) else {}

    async def ask(
        self, path: str, body: dict[str, Any], timeout_s: float, not_to: str = ""
    ) -> tuple[Peer, int, str]:
        """An internal request to the leader: who answered, its status and its
        body. ``not_to`` names a Raft address that must not be the one
        answering (a leaving leader)."""
        leader = self.leader()
        if leader is None or (not_to and leader.raft == not_to):
            raise NoQuorumError("no other voter leads yet")
        status, text = await self._post(leader, path, body, timeout_s)
        return leader, status, text

    async def ask_leader(
        self, path: str, body: dict[str, Any], timeout_s: float, not_to: str = ""
    ) -> None:
        """``ask``, for a request the leader must carry out (200 or an error)."""
        leader, status, text = await self.ask(path, body, timeout_s, not_to)
        if status != 200:
            raise Unavailable(f"{leader.id} answered {status}: {text}")

    async def _post(
        self, leader: Peer, path: str, body: dict[str, Any], timeout_s: float | None
    ) -> tuple[int, str]:
        # An explicit timeout=None would mean "wait forever" to aiohttp, and
        # a frozen leader would then hang the heartbeat (and self-fencing).
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else self._session.timeout
        async with self._session.post(
            self.url(leader.http, path),
            json=body,
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=timeout,
        ) as resp:
            return resp.status, await resp.text()

    async def close(self) -> None:
        await self._session.close()
