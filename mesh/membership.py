"""Membership operations of a peer: join, drain, leave, graceful shutdown.

Two layers change together and in a fixed order. The replicated state says
which peers exist and which may be given work (``peer_join`` reserves an id,
``peer_drain``/``peer_stopping`` stop new assignments, ``peer_leave`` removes a
peer and requeues what it owned); pysyncobj's voter set says who votes. A
joining voter is reserved in the state first (so a duplicate id is refused
before Raft changes), then added to Raft, then started. A leaving peer owns
nothing before it leaves the state, and leaves the state before it leaves
Raft, because once out of Raft it can no longer commit anything.

A joining voter never votes before it has shown that it works: it starts as a
learner (pysyncobj's read-only node, like an executor), receives the log, and
asks the leader for promotion with the index it has applied; the leader adds it
to Raft only when it has caught up and the voters that are up stay a majority.
The learner then restarts its SyncObj as a voter in-process. A reservation that
never gets that far (a made-up address, a joiner that cannot connect) is removed
by the leader after ``join_timeout_s``, so it never costs the mesh its quorum.

The guard rails live in the state machine, where every peer re-validates them;
they are checked here first only to answer without draining anyone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from raftmesh.consensus import commands
from raftmesh.consensus.errors import NoQuorum, ProposalFailed
from raftmesh.consensus.model import (
    DRAIN_FINISH,
    DRAIN_RELEASE,
    PEER_DOWN,
    PEER_JOINING,
    PEER_LEFT,
    PEER_UP,
    VOTER,
)
from raftmesh.consensus.results import Rejected, Requeued
from raftmesh.consensus.state import leave_refusal
from raftmesh.mesh.errors import (
    BadRequest,
    Conflict,
    MeshError,
    NotLeader,
    PeerNotFound,
    Unavailable,
    refusal,
)
from raftmesh.mesh.schemas import JoinRequest, parse_request
from raftmesh.mesh.settings import Settings

if TYPE_CHECKING:
    # Types only: `mesh join` imports this module for its data-dir markers,
    # and a client command must not load the Raft binding.
    from raftmesh.mesh.leader_link import LeaderLink
    from raftmesh.mesh.proposer import Proposer
    from raftmesh.runner.slots import Slots

log = logging.getLogger("raftmesh.membership")

# Written into the data dir of a peer that left: starting it again would bring
# back a member the others have removed.
LEFT_MARKER = "LEFT"
# Written by `mesh join` into the data dir of a voter that is still a learner:
# started again, it goes on as a learner until it is promoted.
LEARNER_MARKER = "LEARNER"
MEMBERSHIP_RETRY_S = 15.0
# A learner is promoted when it has applied the log up to this many entries
# short of the leader's commit index.
PROMOTE_LAG_ENTRIES = 20
PROMOTE_RETRY_S = 0.5


def _cid() -> str:
    return uuid.uuid4().hex


def _now_ms() -> int:
    return int(time.time() * 1000)


def left_marker(data_dir: str) -> Path:
    return Path(data_dir) / LEFT_MARKER


def mark_learner(data_dir: str) -> None:
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    (Path(data_dir) / LEARNER_MARKER).write_text("joined as a learner; promoted once caught up\n")


class PromotionRefused(Exception):
    """The leader will never promote this learner (its reservation is gone)."""


def is_learner(settings: Settings) -> bool:
    """A voter that joined and has not been promoted yet starts as a learner."""
    return settings.role == VOTER and (Path(settings.data_dir) / LEARNER_MARKER).exists()


class Membership:
    """Takes the parts it acts through, not the peer: the proposer (commit,
    read the state, the Raft node), this peer's slots, the link to the leader."""

    def __init__(
        self,
        settings: Settings,
        incarnation: str,
        proposer: Proposer,
        slots: Slots,
        link: LeaderLink,
        request_exit: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._incarnation = incarnation
        self._proposer = proposer
        self._slots = slots
        self._link = link
        self._request_exit = request_exit
        self.leaving = False
        self.shutting_down = False
        self.learning = is_learner(settings)
        self.exit_status = 0

    # -- join -------------------------------------------------------------

    async def join(self, body: Any) -> dict[str, Any]:
        """Admit a new peer: reserve its id and answer with the voter set it
        must start with. A voter starts as a learner (``learner`` in the
        answer): it becomes a voter only through ``promote``."""
        request = parse_request(body, JoinRequest)
        peer_id, http = request.id, request.http
        role = request.role or VOTER
        raft = (request.raft or "") if role == VOTER else ""
        result = await self._proposer.propose(
            commands.PeerJoin(_cid(), _now_ms(), peer_id, raft, http, role)
        )
        if isinstance(result, Rejected):
            raise refusal(result.reason, f"cannot join {peer_id}: {result.message}")
        voters = self._proposer.raft.voters()
        learner = role == VOTER and raft not in voters
        if learner:
            log.info("voter %s (%s) reserved: it joins as a learner first", peer_id, raft)
        return {"id": peer_id, "role": role, "voters": voters, "learner": learner}

    # -- promotion (leader side) --------------------------------------------

    async def promote(self, body: Any) -> dict[str, Any]:
        """Internal: a learner that has caught up asks to become a voter."""
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        peer_id, addr, applied = body.get("id"), body.get("raft"), body.get("applied")
        if (
            not isinstance(peer_id, str)
            or not isinstance(addr, str)
            or not isinstance(applied, int)
        ):
            raise BadRequest("promotion needs 'id', 'raft' and 'applied' (the applied log index)")
        raft = self._proposer.raft
        if not raft.is_leader:
            raise NotLeader("this peer is not the leader")
        voters = raft.voters()
        with raft.lock:
            member = raft.state.peers.get(peer_id)
            up = {
                p.raft for p in raft.state.peers.values() if p.role == VOTER and p.status == PEER_UP
            }
        if (
            member is None
            or member.status == PEER_LEFT
            or member.role != VOTER
            or member.raft != addr
        ):
            raise Conflict(
                f"no pending voter join of {peer_id} at {addr} (it expired or was removed): "
                "join again with a fresh --data-dir"
            )
        if addr in voters:
            return {"voters": voters}
        if member.status != PEER_JOINING:
            raise Conflict(f"{peer_id} is {member.status}, not a pending join")
        # Leave the promoted voter time to come up before the reservation expires.
        timeout_ms = self._settings.join_timeout_s * 1000
        if _now_ms() - member.since_ms > 0.75 * timeout_ms:
            raise Conflict(
                f"the join of {peer_id} is about to expire ({self._settings.join_timeout_s:g} s): "
                "join again with a fresh --data-dir"
            )
        commit = int(raft.status()["commit_idx"])
        if commit - applied > PROMOTE_LAG_ENTRIES:
            raise Unavailable(f"{peer_id} has applied {applied} of {commit} entries: not caught up")
        live = sum(1 for v in voters if v in up) + 1  # the learner has just shown it is live
        if live <= (len(voters) + 1) / 2:
            raise Unavailable(
                f"promoting {peer_id} would make {len(voters) + 1} voters of which only {live} "
                "are up: they could not form a majority; waiting for voters to come back"
            )

        async def add() -> None:
            if addr not in raft.voters():
                await raft.add_voter(addr)

        await self._retry_membership(add, f"adding voter {addr}")
        log.info(
            "learner %s (%s) caught up (%d of %d): now a voter", peer_id, addr, applied, commit
        )
        return {"voters": raft.voters()}

    # -- promotion (learner side) -------------------------------------------

    async def promotion_loop(self) -> None:
        """A learner asks the leader for promotion until it is a voter; it gives
        up (and the process exits 1) when its join expires."""
        if not self.learning:
            return
        deadline = time.monotonic() + self._settings.join_timeout_s
        while True:
            try:
                voters = await self._ask_promotion()
                break
            except PromotionRefused as exc:
                return self._give_up(str(exc))
            except (aiohttp.ClientError, TimeoutError, ValueError, MeshError) as exc:
                if time.monotonic() >= deadline:
                    return self._give_up(
                        f"not promoted within {self._settings.join_timeout_s:g} s ({exc}): "
                        "check that this peer reaches the voters' Raft ports and they reach its own"
                    )
                log.debug("not promoted yet: %s", exc)
            await asyncio.sleep(PROMOTE_RETRY_S)
        try:
            await self._proposer.raft.become_voter(self._settings.raft, voters)
        except Exception as exc:  # a task boundary: the process must not hang as a zombie learner
            log.exception("could not restart as a voter")
            return self._give_up(
                f"promoted, but could not start as voter {self._settings.raft}: {exc}"
            )
        (Path(self._settings.data_dir) / LEARNER_MARKER).unlink(missing_ok=True)
        self.learning = False
        log.info("promoted: a voter now (voters %s)", ", ".join(voters))

    def _give_up(self, why: str) -> None:
        log.error("join failed: %s", why)
        self.exit_status = 1
        self._request_exit()

    async def _ask_promotion(self) -> list[str]:
        raft = self._proposer.raft
        body = {
            "id": self._settings.id,
            "raft": self._settings.raft,
            "applied": raft.status()["last_applied"],
        }
        leader, status, text = await self._link.ask(
            "/internal/v1/voters/promote", body, MEMBERSHIP_RETRY_S + 5
        )
        answer = json.loads(text) if text else {}
        if status == 409:
            raise PromotionRefused(answer["error"]["message"])
        if status != 200:
            raise Unavailable(f"{leader.id} answered {status}: {text}")
        return list(answer["voters"])

    # -- leader duties ------------------------------------------------------

    async def tend(self) -> None:
        """Leader: remove expired join reservations, and after ``mesh recover``
        the voters the mesh lost for good."""
        raft = self._proposer.raft
        timeout_ms = self._settings.join_timeout_s * 1000
        now = _now_ms()
        kept = raft.recovered_voters
        voters = raft.voters()
        with raft.lock:
            members = list(raft.state.peers.values())
        for member in members:
            if member.status == PEER_JOINING and now - member.since_ms > timeout_ms:
                if member.role == VOTER and member.raft in voters:
                    await self._retry_membership(
                        lambda a=member.raft: raft.remove_voter(a), f"removing voter {member.raft}"
                    )
                result = await self._proposer.propose(commands.PeerLeave(_cid(), now, member.id))
                if isinstance(result, Rejected):
                    log.debug("expired join of %s not removed yet: %s", member.id, result.message)
                    continue
                log.warning(
                    "join of %s (%s) expired: it did not connect, catch up and come up within "
                    "%g s; reservation removed",
                    member.id,
                    member.raft or member.http,
                    self._settings.join_timeout_s,
                )
            elif (
                kept is not None
                and member.role == VOTER
                and member.status in (PEER_UP, PEER_DOWN)
                and member.raft not in kept
                and member.raft not in voters
            ):
                result = await self._proposer.propose(
                    commands.PeerLeave(_cid(), now, member.id, True)
                )
                log.warning("recovery: voter %s lost for good, removed (%s)", member.id, result)

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
        result = await self._proposer.propose(commands.PeerDrain(_cid(), _now_ms(), peer_id, mode))
        if isinstance(result, Rejected):
            raise refusal(result.reason, f"cannot drain {peer_id}: {result.message}")
        return self.describe(peer_id)

    def describe(self, peer_id: str) -> dict[str, Any]:
        raft = self._proposer.raft
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
        raft = self._proposer.raft
        with raft.lock:
            member = raft.state.peers.get(peer_id)
            why = None if member is None else leave_refusal(raft.state, member)
        if member is None or member.status == PEER_LEFT:
            raise PeerNotFound(f"no peer {peer_id!r} in this mesh")
        if why is not None:
            raise Conflict(f"cannot remove {peer_id}: {why}")
        if peer_id != self._settings.id and member.status == PEER_UP:
            raise Conflict(
                f"peer {peer_id} is up: ask it to leave itself (mesh leave --peer http://{member.http}) "
                "so that its runs are drained first"
            )
        if peer_id == self._settings.id:
            if self.leaving:
                raise Conflict(f"{peer_id} is already leaving")
            self.leaving = True
            try:
                await self._drain_self(DRAIN_RELEASE if release else DRAIN_FINISH)
            except MeshError:
                self.leaving = False
                raise
        result = await self._proposer.propose(commands.PeerLeave(_cid(), _now_ms(), peer_id))
        if not isinstance(result, Requeued):
            self.leaving = False
            message = result.message if isinstance(result, Rejected) else repr(result)
            raise Conflict(f"cannot remove {peer_id}: {message}")
        # A voter's pending join (a learner) never was a Raft voter.
        if member.role == VOTER and member.raft in raft.voters():
            await self._remove_voter(member.raft, own=peer_id == self._settings.id)
        log.info("peer %s left the mesh (%d runs requeued)", peer_id, result.requeued)
        if peer_id == self._settings.id:
            left_marker(self._settings.data_dir).write_text(
                f"{peer_id} left the mesh at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
            )
            self._request_exit()
        return {"id": peer_id, "left": True, "requeued": result.requeued}

    async def _drain_self(self, mode: str) -> None:
        """Stop getting runs; wait until this peer owns none (releasing what is
        left once the grace period is over)."""
        await self.drain(self._settings.id, mode)
        grace_s = self._settings.shutdown_grace_s
        if not await self._wait_owning_nothing(grace_s):
            log.warning("runs still here after %.0fs: releasing them", grace_s)
            for run_id in self._slots.running():
                self._slots.release(run_id)
            if not await self._wait_owning_nothing(5.0):
                raise Unavailable(f"{self._settings.id} could not hand over its runs; try again")

    async def _wait_owning_nothing(self, timeout_s: float) -> bool:
        raft = self._proposer.raft
        deadline = time.monotonic() + timeout_s
        while True:
            with raft.lock:
                owned = raft.state.running_on(self._settings.id)
            if owned == 0 and self._slots.busy == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def _remove_voter(self, addr: str, own: bool) -> None:
        raft = self._proposer.raft
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
            except (aiohttp.ClientError, TimeoutError, ValueError, MeshError) as exc:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"the leader did not remove voter {addr}: {exc}") from exc
                await asyncio.sleep(0.3)

    async def _ask_leader_to_remove(self, addr: str) -> None:
        await self._link.ask_leader(
            "/internal/v1/voters/remove", {"raft": addr}, MEMBERSHIP_RETRY_S, not_to=addr
        )

    async def remove_voter(self, body: Any) -> None:
        """Internal: another voter, about to leave, asks for its own removal."""
        addr = body.get("raft") if isinstance(body, dict) else None
        if not isinstance(addr, str):
            raise BadRequest("field 'raft' must be the leaving voter's Raft address")
        raft = self._proposer.raft
        if addr not in raft.voters():
            return
        await self._retry_membership(lambda: raft.remove_voter(addr), f"removing voter {addr}")

    # -- graceful shutdown --------------------------------------------------

    async def shutdown(self) -> None:
        """SIGTERM: take nothing new, hand back or finish what runs here within
        the grace period, and leave owning nothing. The peer stays a member:
        started again with the same id, it takes runs again."""
        self.shutting_down = True
        grace_s = self._settings.shutdown_grace_s
        started = time.monotonic()
        log.info("shutting down: releasing runs at their next step (grace %.0fs)", grace_s)
        await self._propose_quietly(
            commands.PeerStopping(_cid(), _now_ms(), self._settings.id, self._incarnation)
        )
        for run_id in self._slots.running():
            self._slots.release(run_id)
        if not await self._wait_slots_empty(grace_s):
            left = self._slots.running()
            log.warning("grace period over: stopping %d runs and releasing them", len(left))
            for run_id in left:
                self._slots.stop(run_id)
            await asyncio.gather(
                *(
                    self._propose_quietly(commands.Release(_cid(), _now_ms(), run_id, epoch))
                    for run_id, epoch in left.items()
                )
            )
        # Anything assigned but never started goes back to the queue too.
        await self._propose_quietly(
            commands.PeerDown(_cid(), _now_ms(), self._settings.id, self._incarnation)
        )
        raft = self._proposer.raft
        if raft.is_voter and raft.is_leader:
            await raft.transfer_leadership(timeout_s=2.0)
        log.info("handed everything back in %.1fs", time.monotonic() - started)

    async def _wait_slots_empty(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._slots.busy:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _propose_quietly(self, cmd: commands.Command) -> None:
        """Shutdown goes on without a quorum: the leader then takes the peer
        down by its TTL, which requeues the same runs."""
        try:
            await self._proposer.propose(cmd, budget_s=3.0)
        except Unavailable as exc:
            log.warning("could not commit %s while stopping: %s", cmd.op, exc.message)


def check_not_left(data_dir: str) -> None:
    marker = left_marker(data_dir)
    if marker.exists():
        raise SystemExit(
            f"{data_dir} belongs to a peer that left the mesh ({marker.read_text().strip()}); "
            "use a new --data-dir and `mesh join` to bring it back"
        )


__all__ = ["Membership", "check_not_left", "mark_learner"]
