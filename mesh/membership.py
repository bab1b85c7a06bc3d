"""Membership operations of a peer: join, drain, leave, graceful shutdown.

Two layers change together and in a fixed order. The replicated state says
which peers exist and which may be given work (``peer_join`` reserves an id,
``peer_drain``/``peer_stopping`` stop new assignments, ``peer_leave`` removes a
peer and requeues what it owned); pysyncobj's voter set says who votes. A
joining voter is reserved in the state first (so a duplicate id is refused
before Raft changes), then added to Raft, then started. A leaving peer owns
nothing before it leaves the state, and leaves the state before it leaves
Raft, because once out of Raft it can no longer commit anything.

The guard rails live in the state machine, where every peer re-validates them;
they are checked here first only to answer without draining anyone.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from raftmesh.consensus import commands
from raftmesh.consensus.errors import NoQuorum, ProposalFailed
from raftmesh.consensus.model import (
    DRAIN_FINISH,
    DRAIN_RELEASE,
    EXECUTOR,
    PEER_LEFT,
    PEER_UP,
    ROLES,
    VOTER,
)
from raftmesh.consensus.state import leave_refusal
from raftmesh.mesh.errors import (
    BadRequest,
    Conflict,
    MeshError,
    NoQuorumError,
    PeerNotFound,
    Unavailable,
)

if TYPE_CHECKING:
    from raftmesh.mesh.peer import Peer

log = logging.getLogger("raftmesh.membership")

# Written into the data dir of a peer that left: starting it again would bring
# back a member the others have removed.
LEFT_MARKER = "LEFT"
MEMBERSHIP_RETRY_S = 15.0


def _cid() -> str:
    return uuid.uuid4().hex


def _now_ms() -> int:
    return int(time.time() * 1000)


def left_marker(data_dir: str) -> Path:
    return Path(data_dir) / LEFT_MARKER


class Membership:
    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self.leaving = False
        self.shutting_down = False

    # -- join -------------------------------------------------------------

    async def join(self, body: Any) -> dict[str, Any]:
        """Admit a new peer: reserve its id, make it a voter if it is one, and
        answer with the voter set it must start with."""
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        peer_id, http = body.get("id"), body.get("http")
        role = body.get("role") or VOTER
        raft = body.get("raft") or ""
        if not isinstance(peer_id, str) or not peer_id:
            raise BadRequest("field 'id' must be a non-empty string: the new peer's id")
        if not isinstance(http, str) or ":" not in http:
            raise BadRequest("field 'http' must be HOST:PORT: the new peer's API address")
        if role not in ROLES:
            raise BadRequest(f"field 'role' must be one of {', '.join(sorted(ROLES))}")
        if role == VOTER and (not isinstance(raft, str) or ":" not in raft):
            raise BadRequest("field 'raft' must be HOST:PORT: a voter needs a Raft address")
        if role == EXECUTOR:
            raft = ""
        peer = self._peer
        result = await peer._propose(
            commands.peer_join(_cid(), _now_ms(), peer_id, raft, http, role)
        )
        if not result.get("ok"):
            raise Conflict(f"cannot join {peer_id}: {result.get('error')}")
        raft_node = peer._raft()
        if role == VOTER and raft not in raft_node.voters():
            await self._retry_membership(lambda: raft_node.add_voter(raft), f"adding voter {raft}")
            log.info("voter %s (%s) added", peer_id, raft)
        return {"id": peer_id, "role": role, "voters": raft_node.voters()}

    async def _retry_membership(self, change: Any, what: str) -> None:
        """One membership change at a time: a change refused because another is
        pending is tried again until the budget runs out."""
        deadline = time.monotonic() + MEMBERSHIP_RETRY_S
        while True:
            try:
                await change()
                return
            except (ProposalFailed, NoQuorum) as exc:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"{what} failed: {exc}; retry shortly") from exc
                await asyncio.sleep(0.3)

    # -- drain ------------------------------------------------------------

    async def drain(self, peer_id: str, mode: str) -> dict[str, Any]:
        """``mode``: "finish", "release", or "" (undrain)."""
        result = await self._peer._propose(commands.peer_drain(_cid(), _now_ms(), peer_id, mode))
        if not result.get("ok"):
            raise PeerNotFound(f"cannot drain {peer_id}: {result.get('error')}")
        return self.describe(peer_id)

    def describe(self, peer_id: str) -> dict[str, Any]:
        raft = self._peer._raft()
        with raft.lock:
            member = raft.state.peers.get(peer_id)
            if member is None:
                raise PeerNotFound(f"no peer {peer_id!r} in this mesh")
            return {
                "id": member.id,
                "status": member.status,
                "role": member.role,
                "drain": member.drain or None,
                "running": raft.state.running_on(member.id),
            }

    # -- leave ------------------------------------------------------------

    async def leave(self, peer_id: str, release: bool) -> dict[str, Any]:
        peer = self._peer
        raft = peer._raft()
        with raft.lock:
            member = raft.state.peers.get(peer_id)
            refusal = None if member is None else leave_refusal(raft.state, member)
        if member is None or member.status == PEER_LEFT:
            raise PeerNotFound(f"no peer {peer_id!r} in this mesh")
        if refusal is not None:
            raise Conflict(f"cannot remove {peer_id}: {refusal}")
        if peer_id != peer.id and member.status == PEER_UP:
            raise Conflict(
                f"peer {peer_id} is up: ask it to leave itself (mesh leave --peer http://{member.http}) "
                "so that its runs are drained first"
            )
        if peer_id == peer.id:
            if self.leaving:
                raise Conflict(f"{peer_id} is already leaving")
            self.leaving = True
            try:
                await self._drain_self(DRAIN_RELEASE if release else DRAIN_FINISH)
            except MeshError:
                self.leaving = False
                raise
        result = await peer._propose(commands.peer_leave(_cid(), _now_ms(), peer_id))
        if not result.get("ok"):
            self.leaving = False
            raise Conflict(f"cannot remove {peer_id}: {result.get('error')}")
        if member.role == VOTER:
            await self._remove_voter(member.raft, own=peer_id == peer.id)
        log.info("peer %s left the mesh (%d runs requeued)", peer_id, result.get("requeued", 0))
        if peer_id == peer.id:
            left_marker(peer.settings.data_dir).write_text(
                f"{peer_id} left the mesh at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
            )
            peer.request_exit()
        return {"id": peer_id, "left": True, "requeued": result.get("requeued", 0)}

    async def _drain_self(self, mode: str) -> None:
        """Stop getting runs; wait until this peer owns none (releasing what is
        left once the grace period is over)."""
        peer = self._peer
        await self.drain(peer.id, mode)
        grace_s = peer.settings.shutdown_grace_s
        if not await self._wait_owning_nothing(grace_s):
            log.warning("runs still here after %.0fs: releasing them", grace_s)
            for run_id in peer.slots.running():
                peer.slots.release(run_id)
            if not await self._wait_owning_nothing(5.0):
                raise Unavailable(f"{peer.id} could not hand over its runs; try again")

    async def _wait_owning_nothing(self, timeout_s: float) -> bool:
        peer = self._peer
        raft = peer._raft()
        deadline = time.monotonic() + timeout_s
        while True:
            with raft.lock:
                owned = raft.state.running_on(peer.id)
            if owned == 0 and peer.slots.busy == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def _remove_voter(self, addr: str, own: bool) -> None:
        raft = self._peer._raft()
        if not own:
            await self._retry_membership(lambda: raft.remove_voter(addr), f"removing voter {addr}")
            return
        # The leader drops a removed voter at once, so the removal's outcome
        # never reaches it: another voter asks for it and waits for the commit.
        if raft.is_leader and not await raft.transfer_leadership():
            raise Unavailable("could not hand Raft leadership over before leaving; try again")
        deadline = time.monotonic() + MEMBERSHIP_RETRY_S
        while True:
            try:
                await self._ask_leader_to_remove(addr)
                return
            except (aiohttp.ClientError, TimeoutError, MeshError) as exc:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"the leader did not remove voter {addr}: {exc}") from exc
                await asyncio.sleep(0.3)

    async def _ask_leader_to_remove(self, addr: str) -> None:
        peer = self._peer
        raft = peer._raft()
        leader_addr = raft.leader_addr
        with raft.lock:
            leader = raft.state.peer_by_raft(leader_addr) if leader_addr else None
        if leader is None or leader.raft == addr or peer._client is None:
            raise NoQuorumError("no other voter leads yet")
        async with peer._client.post(
            f"http://{leader.http}/internal/v1/voters/remove",
            json={"raft": addr},
            headers={"Authorization": f"Bearer {peer.internal_token}"},
            timeout=aiohttp.ClientTimeout(total=MEMBERSHIP_RETRY_S),
        ) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise Unavailable(f"{leader.id} answered {resp.status}: {body}")

    async def remove_voter(self, body: Any) -> None:
        """Internal: another voter, about to leave, asks for its own removal."""
        addr = body.get("raft") if isinstance(body, dict) else None
        if not isinstance(addr, str):
            raise BadRequest("field 'raft' must be the leaving voter's Raft address")
        raft = self._peer._raft()
        if addr not in raft.voters():
            return
        await self._retry_membership(lambda: raft.remove_voter(addr), f"removing voter {addr}")

    # -- graceful shutdown --------------------------------------------------

    async def shutdown(self) -> None:
        """SIGTERM: take nothing new, hand back or finish what runs here within
        the grace period, and leave owning nothing. The peer stays a member:
        started again with the same id, it takes runs again."""
        peer = self._peer
        self.shutting_down = True
        grace_s = peer.settings.shutdown_grace_s
        started = time.monotonic()
        log.info("shutting down: releasing runs at their next step (grace %.0fs)", grace_s)
        await self._propose_quietly(
            commands.peer_stopping(_cid(), _now_ms(), peer.id, peer.incarnation)
        )
        for run_id in peer.slots.running():
            peer.slots.release(run_id)
        if not await self._wait_slots_empty(grace_s):
            left = peer.slots.running()
            log.warning("grace period over: stopping %d runs and releasing them", len(left))
            for run_id in left:
                peer.slots.stop(run_id)
            await asyncio.gather(
                *(
                    self._propose_quietly(commands.release(_cid(), _now_ms(), run_id, epoch))
                    for run_id, epoch in left.items()
                )
            )
        # Anything assigned but never started goes back to the queue too.
        await self._propose_quietly(
            commands.peer_down(_cid(), _now_ms(), peer.id, peer.incarnation)
        )
        raft = peer._raft()
        if raft.is_voter and raft.is_leader:
            await raft.transfer_leadership(timeout_s=2.0)
        log.info("handed everything back in %.1fs", time.monotonic() - started)

    async def _wait_slots_empty(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._peer.slots.busy:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _propose_quietly(self, cmd: commands.Command) -> None:
        """Shutdown goes on without a quorum: the leader then takes the peer
        down by its TTL, which requeues the same runs."""
        try:
            await self._peer._propose(cmd, budget_s=3.0)
        except Unavailable as exc:
            log.warning("could not commit %s while stopping: %s", cmd["op"], exc.message)


def check_not_left(data_dir: str) -> None:
    marker = left_marker(data_dir)
    if marker.exists():
        raise SystemExit(
            f"{data_dir} belongs to a peer that left the mesh ({marker.read_text().strip()}); "
            "use a new --data-dir and `mesh join` to bring it back"
        )


__all__ = ["Membership", "check_not_left"]
