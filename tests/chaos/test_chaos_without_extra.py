"""`mesh chaos run` after a plain install (no `chaos` extra, so no matplotlib):
the run and its report must not be lost to the missing plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PG_URL = os.environ.get("RAFTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

# As if matplotlib were not installed: importing it fails as a missing module does.
WITHOUT_MATPLOTLIB = (
    "import sys\n"
    "sys.modules['matplotlib'] = None\n"
    "from raftmesh.cli.main import main\n"
    "main(sys.argv[1:], prog_name='mesh')\n"
)


@pytest.mark.slow
def test_mesh_chaos_run_without_the_extra_writes_its_report_and_a_hint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, "chaos", "run", "--peers", "3"]
        + ["--duration", "6", "--faults", "kill", "--seed", "2", "--drain", "30"]
        + ["--storage", PG_URL, "--out", str(out), "--rate", "2", "--clients", "2"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = (out / "report.txt").read_text()
    assert "verdict: PASS" in report
    assert (out / "verdict.json").exists()
    assert not (out / "timeline.png").exists()
    assert "pip install 'raftmesh[chaos]'" in done.stdout
