"""What a chaos run recorded: client operations, observations, faults, cluster samples.

Plain frozen records with JSON round-trips, so a run's history is a file the
checker (and a human) can read again later, and unit tests can build violating
histories by hand. Times are wall-clock milliseconds, the same clock the peers
and the ledger use (everything runs on one host).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Submission attempt outcomes, as a Jepsen client would classify them.
OK = "ok"  # acknowledged (202 created or 200 existing)
FAIL = "fail"  # definitely not applied (refused connection, 4xx)
INFO = "info"  # indeterminate (timeout, 503): it may still commit

# The signal the ``chaos_signal`` agent waits for (chaos.agents).
SIGNAL_NAME = "go"


@dataclass(frozen=True)
class SubmitOp:
    key: str
    peer: str
    start_ms: int
    end_ms: int
    outcome: str
    run_id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Observation:
    """A client's read of a run (GET /v1/runs/{id}, or storage at the end)."""

    run_id: str
    at_ms: int
    status: str
    result: str | None = None  # canonical JSON of the result, for comparison
    source: str = "api"


@dataclass(frozen=True)
class Fault:
    """``lost`` names the peers whose runs lost their owner at ``start_ms``."""

    kind: str
    detail: str
    start_ms: int
    end_ms: int
    targets: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeerLoad:
    id: str
    slots: int
    running: int
    status: str
    # Slots plus the mesh's prefetch; None in a history from before prefetch.
    capacity: int | None = None


@dataclass(frozen=True)
class ParkedRun:
    """A waiting or paused run as a peer's committed state lists it."""

    id: str
    status: str
    owner: str | None


@dataclass(frozen=True)
class ClusterSample:
    at_ms: int
    source: str
    leader: str | None
    peers: tuple[PeerLoad, ...]
    # tenant -> (running, cap); empty when the API does not expose caps.
    tenants: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Active runs by status, read in the same state as ``peers`` (so the
    # slots the peers hold can be set against the runs that are running).
    runs: dict[str, int] = field(default_factory=dict)
    # The waiting and paused runs the same peer listed right after; None when
    # that read failed.
    parked: tuple[ParkedRun, ...] | None = None


@dataclass(frozen=True)
class SignalOp:
    """One attempt to send a signal; ``seq`` and ``duplicate`` are the 202's.
    ``deliberate`` marks a key the client had already seen acknowledged and
    sent again on purpose (it must be delivered once all the same)."""

    run_id: str
    name: str
    key: str
    data: str  # canonical JSON
    peer: str
    start_ms: int
    end_ms: int
    outcome: str
    seq: int | None = None
    duplicate: bool | None = None
    deliberate: bool = False
    error: str | None = None


@dataclass(frozen=True)
class PauseOp:
    """An operator's pause or resume of a run; ``status`` is the view's
    status in the answer (a running run stays running until its owner
    releases it at a step boundary)."""

    run_id: str
    action: str  # "pause" or "resume"
    peer: str
    start_ms: int
    end_ms: int
    outcome: str
    status: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ScheduleRecord:
    """The schedule the workload made, as the mesh answered it. Ticks after
    ``created_ms`` and before ``deleted_ms`` (the start of the delete, None if
    it was never deleted) are the ones it owes."""

    id: str
    every_ms: int
    catchup: str
    overlap: str
    tenant: str
    created_ms: int
    deleted_ms: int | None = None
    fired: int | None = None
    skipped: int | None = None


@dataclass(frozen=True)
class StoredRun:
    id: str
    status: str
    epoch: int
    owner: str | None
    idempotency_key: str | None
    result: str | None
    result_epoch: int | None
    finished_at_ms: int | None
    error: str | None = None
    agent: str | None = None
    parent_id: str | None = None


@dataclass(frozen=True)
class StoredWrite:
    """A step checkpoint or an event as storage holds it."""

    run_id: str
    seq: int
    epoch: int
    at_ms: int
    peer: str | None = None


@dataclass(frozen=True)
class StoredSignal:
    run_id: str
    name: str
    seq: int
    key: str | None
    data: str  # canonical JSON


@dataclass(frozen=True)
class Delivery:
    """A journaled ``wait_for_signal``: the ``index``-th signal of ``name``
    the run consumed; ``data`` None when the wait timed out."""

    run_id: str
    name: str
    index: int
    step_seq: int
    data: str | None


@dataclass
class StorageSnapshot:
    runs: dict[str, StoredRun] = field(default_factory=dict)
    steps: list[StoredWrite] = field(default_factory=list)
    events: list[StoredWrite] = field(default_factory=list)
    signals: list[StoredSignal] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)


@dataclass
class History:
    start_ms: int = 0
    end_ms: int = 0
    submits: list[SubmitOp] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    samples: list[ClusterSample] = field(default_factory=list)
    signals: list[SignalOp] = field(default_factory=list)
    schedules: list[ScheduleRecord] = field(default_factory=list)
    pauses: list[PauseOp] = field(default_factory=list)

    def save(self, path: Path) -> None:
        with path.open("w") as fh:
            fh.write(json.dumps({"type": "run", "start_ms": self.start_ms, "end_ms": self.end_ms}))
            fh.write("\n")
            for kind, items in (
                ("submit", self.submits),
                ("observe", self.observations),
                ("fault", self.faults),
                ("sample", self.samples),
                ("signal", self.signals),
                ("schedule", self.schedules),
                ("pause", self.pauses),
            ):
                for item in items:
                    fh.write(json.dumps({"type": kind, **asdict(item)}) + "\n")

    @classmethod
    def load(cls, path: Path) -> History:
        history = cls()
        for line in path.read_text().splitlines():
            data: dict[str, Any] = json.loads(line)
            kind = data.pop("type")
            if kind == "run":
                history.start_ms, history.end_ms = data["start_ms"], data["end_ms"]
            elif kind == "submit":
                history.submits.append(SubmitOp(**data))
            elif kind == "observe":
                history.observations.append(Observation(**data))
            elif kind == "fault":
                data["targets"], data["lost"] = tuple(data["targets"]), tuple(data["lost"])
                history.faults.append(Fault(**data))
            elif kind == "sample":
                peers = tuple(PeerLoad(**p) for p in data.pop("peers"))
                tenants = {k: (v[0], v[1]) for k, v in data.pop("tenants").items()}
                parked = data.pop("parked", None)
                history.samples.append(
                    ClusterSample(
                        peers=peers,
                        tenants=tenants,
                        parked=None if parked is None else tuple(ParkedRun(**r) for r in parked),
                        **data,
                    )
                )
            elif kind == "signal":
                history.signals.append(SignalOp(**data))
            elif kind == "schedule":
                history.schedules.append(ScheduleRecord(**data))
            elif kind == "pause":
                history.pauses.append(PauseOp(**data))
        return history
