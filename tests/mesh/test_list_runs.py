"""``GET /v1/runs`` under load (issue 10, finding 9): the list reads the
replicated state under its lock, so it must not build a view (with its
``waiting_for`` explanation) of every active run to return one page.

MeshService against a real replicated state (applied commands, no Raft
around it) and a real SQLite store."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

from raftmesh.consensus import commands
from raftmesh.consensus.model import Run
from raftmesh.consensus.state import MeshState
from raftmesh.mesh.events import EventHub
from raftmesh.mesh.liveness import Liveness
from raftmesh.mesh.metrics import Metrics
from raftmesh.mesh.proposer import Proposer
from raftmesh.mesh.scheduler import Reason, Said, Scheduler
from raftmesh.mesh.service import MeshService
from raftmesh.mesh.settings import Settings
from raftmesh.runner.registry import Registry
from raftmesh.storage import Store

ACTIVE = 3000


@dataclass
class CountingScheduler(Scheduler):
    """Counts the explanations asked for: one per view built."""

    explained: int = 0

    def waiting_for(
        self, state: MeshState, run: Run, now_ms: int, said: Said | None = None
    ) -> Reason | None:
        self.explained += 1
        return super().waiting_for(state, run, now_ms, said)


@dataclass
class StateOnly:
    """What Proposer.read needs of a Raft node: its lock and its state."""

    state: MeshState
    lock: Any


async def test_a_page_builds_views_for_its_runs_only(store: Store) -> None:
    state = MeshState()
    runs = [
        {"id": f"r{i:05d}", "agent": "a", "input": i, "tenant": "big" if i % 3 else "small"}
        for i in range(ACTIVE)
    ]
    for n in range(0, ACTIVE, 500):
        state.apply(commands.Submit(f"c{n}", 1000 + n, runs[n : n + 500]))
    assert len(state.runs) == ACTIVE
    scheduler = CountingScheduler()
    proposer = Proposer(StateOnly(state, threading.Lock()), 1.0, asyncio.Event())  # type: ignore[arg-type]
    service = MeshService(
        Settings(),
        "inc",
        "internal",
        proposer,
        store,
        EventHub(store, 1.0),
        Registry(),
        scheduler,
        Liveness(2.0),
        Metrics(),
        lambda: 0,
        lambda: None,
    )
    page = await service.list_runs(None, 10)
    assert scheduler.explained <= 10, f"{scheduler.explained} views built for a page of 10"
    assert [v["id"] for v in page] == [f"r{i:05d}" for i in range(ACTIVE - 1, ACTIVE - 11, -1)]
    scheduler.explained = 0
    small = await service.list_runs("queued", 5, tenant="small", offset=5)
    assert scheduler.explained <= 10
    newest_small = sorted((r["id"] for r in runs if r["tenant"] == "small"), reverse=True)
    assert [v["id"] for v in small] == newest_small[5:10]
    assert {v["tenant"] for v in small} == {"small"}
