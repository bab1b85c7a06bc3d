"""This peer's presence: announce its incarnation, report to the leader.

A peer learns nothing by RPC; it only has to be known. ``peer_up`` puts this
incarnation (with its slots, labels and agents) into the replicated state, and
a report every heartbeat interval keeps the leader from judging it down. A
confirmed report is also how the peer knows it is not cut off (self-fencing).
The report also asks for this peer's share of the rate limits it uses, and the
answer carries the leases (mesh/rate_limits.py), so they cost no Raft commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from raftmesh.consensus import commands
from raftmesh.consensus.model import PEER_UP, VOTER
from raftmesh.consensus.state import APPLY_FEATURES
from raftmesh.mesh.errors import Unavailable
from raftmesh.mesh.leader_link import LeaderLink
from raftmesh.mesh.liveness import LeaderContact, Liveness
from raftmesh.mesh.proposer import Proposer, new_id, now_ms
from raftmesh.mesh.rate_limits import LeaseBook
from raftmesh.mesh.settings import Settings
from raftmesh.runner.rate_limits import Limiter

log = logging.getLogger("raftmesh.presence")


class Presence:
    def __init__(
        self,
        settings: Settings,
        incarnation: str,
        agents: list[str],
        proposer: Proposer,
        link: LeaderLink,
        liveness: Liveness,
        contact: LeaderContact,
        busy: Callable[[], int],
        quiet: Callable[[], bool],
        on_leader_clock: Callable[[float], None] | None = None,
        rate_limits: tuple[Limiter, LeaseBook] | None = None,
    ) -> None:
        """``busy()`` counts this peer's running attempts; ``quiet()`` is true
        while membership changes this peer (leaving, shutting down), when it
        must not announce itself again; ``on_leader_clock(ms)`` hears how far
        this peer's clock is ahead of the leader's, from each acknowledgement;
        ``rate_limits`` are this peer's leases and, for when it leads, the books
        it grants them from."""
        self._settings = settings
        self.peer_id = settings.id
        self.incarnation = incarnation
        self._agents = agents
        self._proposer = proposer
        self._link = link
        self._liveness = liveness
        self._contact = contact
        self._busy = busy
        self._quiet = quiet
        self._on_leader_clock = on_leader_clock
        self._rate_limits = rate_limits

    @property
    def raft_addr(self) -> str:
        """An executor has no Raft listener to advertise."""
        return self._settings.raft if self._settings.role == VOTER else ""

    async def beat(self) -> None:
        await self._announce_if_needed()
        await self._report()

    async def _announce_if_needed(self) -> None:
        s = self._settings
        with self._proposer.read() as state:
            me = state.peers.get(self.peer_id)
            current = (
                me is not None
                and me.incarnation == self.incarnation
                and me.status == PEER_UP
                and me.slots == s.slots
                and me.labels == s.labels
                and me.http == s.http
                and me.raft == self.raft_addr
                and me.agents == self._agents
                and me.role == s.role
            )
        if current or self._quiet() or self._proposer.raft.leader_addr is None:
            return
        cmd = commands.PeerUp(
            new_id(),
            now_ms(),
            self.peer_id,
            self.incarnation,
            self.raft_addr,
            s.http,
            s.slots,
            dict(s.labels),
            self._agents,
            s.role,
        )
        try:
            await self._proposer.propose(cmd)
        except Unavailable as exc:
            log.info("could not announce yet: %s", exc.message)
            return
        # A leader committed it: its clock for this incarnation runs from about
        # now (Liveness.suspects), so this peer's clock for self-fencing does
        # too, before any heartbeat is answered. Without it a peer cut off
        # before its first acknowledged heartbeat never fenced itself.
        self._contact.confirmed(time.monotonic())

    async def _report(self) -> None:
        raft = self._proposer.raft
        if raft.leader_addr is None:
            return
        if raft.is_leader:
            now = time.monotonic()
            if self._rate_limits is not None:
                limiter, book = self._rate_limits
                limiter.renew(
                    book.grant(self.peer_id, limiter.demand(), raft.term, now), now, book.ttl_s
                )
            self._liveness.heard(self.peer_id, self.incarnation, now, APPLY_FEATURES)
            with self._proposer.read() as state:
                in_contact = self._contact.heard_majority(self._liveness, state.peers.values(), now)
            if in_contact:
                self._contact.confirmed(now)
            return
        sent_ms = now_ms()
        report = {
            "id": self.peer_id,
            "incarnation": self.incarnation,
            "running": self._busy(),
            "applies": sorted(APPLY_FEATURES),
            # The leader compares it with its own clock: the skew diagnostics show.
            "wall_ms": sent_ms,
        }
        if self._rate_limits is not None:
            report["rate_limits"] = self._rate_limits[0].demand()
        sent = time.monotonic()
        # The peer the heartbeat goes to: heartbeat() resolves the same one
        # before its first await.
        leader = self._link.leader()
        try:
            ack = await self._link.heartbeat(report)
            received_ms = now_ms()
            if ack is not None:
                self._contact.confirmed(time.monotonic(), leader.id if leader else None)
                self._renew_leases(ack, sent)
                leader_ms = ack.get("wall_ms")
                if isinstance(leader_ms, int) and self._on_leader_clock is not None:
                    # The leader read its clock about halfway through the round trip.
                    self._on_leader_clock((sent_ms + received_ms) / 2 - leader_ms)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("heartbeat to the leader failed: %s", exc)

    def _renew_leases(self, ack: dict[str, Any], sent: float) -> None:
        """Counted from ``sent``: before the leader granted them, so they end
        here before they end on its books."""
        leases, ttl_s = ack.get("leases"), ack.get("lease_ttl_s")
        if self._rate_limits is None or not isinstance(leases, dict):
            return
        if not isinstance(ttl_s, int | float) or isinstance(ttl_s, bool):
            return
        self._rate_limits[0].renew(leases, sent, float(ttl_s))
