"""The side-effect ledger: what the workload's agents really did, outside the faults' reach.

Storage says what was *recorded*; the ledger says what was *executed*. Every
attempt of the chaos agent appends JSON lines to its own file (one file per
run, epoch and process), written straight to the file system with O_APPEND.
No fault touches that: kill -9 loses nothing the kernel already accepted, a
paused process writes its lines when it wakes, and neither the database proxy
nor the Raft/HTTP proxies sit in between. So the checker sees every step that
ran, including the ones a fenced attempt could not checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEDGER_DIR_ENV = "CHAOS_LEDGER_DIR"

ATTEMPT_START = "attempt_start"
STEP_START = "step_start"
STEP_END = "step_end"
ATTEMPT_END = "attempt_end"
# The attempt ended by suspending (a long sleep, a signal not yet sent,
# children still running) or by being released at a step boundary (a pause):
# the run left its owner, nothing was lost.
ATTEMPT_SUSPEND = "attempt_suspend"


@dataclass(frozen=True)
class LedgerEntry:
    """``seq`` is the step's journal index (-1 for attempt records); ``at_ms`` wall clock."""

    kind: str
    run_id: str
    epoch: int
    peer: str
    seq: int
    at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "run": self.run_id,
            "epoch": self.epoch,
            "peer": self.peer,
            "seq": self.seq,
            "at_ms": self.at_ms,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LedgerEntry:
        return cls(
            kind=str(data["kind"]),
            run_id=str(data["run"]),
            epoch=int(data["epoch"]),
            peer=str(data["peer"]),
            seq=int(data["seq"]),
            at_ms=int(data["at_ms"]),
        )


class LedgerWriter:
    """Appends one attempt's entries to its own file; each line is one write(2)."""

    def __init__(self, directory: str | Path, run_id: str, epoch: int, peer: str) -> None:
        self._path = Path(directory) / f"{run_id}.{epoch}.{peer}.{os.getpid()}.jsonl"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, entry: LedgerEntry) -> None:
        os.write(self._fd, (json.dumps(entry.to_json()) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def read_ledger(directory: str | Path) -> list[LedgerEntry]:
    """Every entry in the directory, by time. A torn last line (a process
    killed mid-write) is skipped: that entry never fully happened."""
    entries: list[LedgerEntry] = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entries.append(LedgerEntry.from_json(json.loads(line)))
            except (ValueError, KeyError):
                continue
    entries.sort(key=lambda e: (e.at_ms, e.run_id, e.epoch, e.seq))
    return entries
