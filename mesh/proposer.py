"""Proposing commands, and reading the replicated state, for the rest of the peer.

Every other part of the shell commits through here and reads the state only
through ``read()``, under the lock the Raft thread applies under, so none of
them needs the Raft node itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from raftmesh.consensus import commands
from raftmesh.consensus.errors import NoQuorum, ProposalFailed
from raftmesh.consensus.raft import RaftNode
from raftmesh.consensus.results import Result
from raftmesh.consensus.state import MeshState
from raftmesh.mesh.errors import NoQuorumError, Unavailable

log = logging.getLogger("raftmesh.proposer")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


class Proposer:
    def __init__(
        self,
        raft: RaftNode,
        commit_timeout_s: float,
        stopping: asyncio.Event,
        on_commit: Callable[[float], None] | None = None,
    ) -> None:
        """``on_commit(seconds)`` hears how long each committed proposal took."""
        self.raft = raft
        self._on_commit = on_commit
        self.commit_timeout_s = commit_timeout_s
        self._stopping = stopping

    @contextmanager
    def read(self) -> Iterator[MeshState]:
        """The state as last applied; hold it only briefly, and never across an await."""
        with self.raft.lock:
            yield self.raft.state

    async def propose(self, cmd: commands.Command, budget_s: float | None = None) -> Result:
        """Commit ``cmd``, retrying ambiguous outcomes with the same cid (the
        state machine applies a cid once) until the budget runs out. Each try
        waits only for what is left of the budget, so the caller has its
        answer (or a 503) within the budget, not a try's timeout after it."""
        budget = self.commit_timeout_s if budget_s is None else budget_s
        started = time.monotonic()
        deadline = started + budget
        while True:
            try:
                left = max(0.05, deadline - time.monotonic())
                result = await self.raft.propose(cmd, timeout_s=left)
                if self._on_commit is not None:
                    self._on_commit(time.monotonic() - started)
                return result
            except NoQuorum as exc:
                if time.monotonic() >= deadline:
                    raise NoQuorumError(
                        f"the mesh could not commit in {budget:.0f}s ({exc}); "
                        "a majority of peers must be up and connected — retry shortly"
                    ) from exc
                await asyncio.sleep(0.1)
            except ProposalFailed as exc:
                raise Unavailable(f"the mesh refused the request: {exc}") from exc

    async def propose_while(self, cmd: commands.Command, relevant: Callable[[], bool]) -> None:
        """Keep proposing until committed or no longer relevant (or stopping)."""
        while not self._stopping.is_set() and relevant():
            try:
                await self.propose(cmd)
                return
            except Unavailable as exc:
                log.warning("retrying %s: %s", cmd.op, exc.message)
                await asyncio.sleep(0.2)
