"""`mesh bench`: every scenario runs end to end (smoke sizes) and leaves numbers behind.

Benchmarks are not tests: nothing here asserts a speed, only that each
scenario still starts its systems, measures, and writes its JSON and plot.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from raftmesh.bench.report import Figure, Result, at_least, at_most, emit
from raftmesh.bench.scenarios import ideal_makespan

PG_URL = os.environ.get("RAFTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
SCENARIOS = ("acceptance", "short-runs", "steps", "many-agents", "failover", "footprint")

# As if the bench extra were not installed: importing celery fails as a missing module does.
WITHOUT_CELERY = (
    "import sys\n"
    "sys.modules['celery'] = None\n"
    "from raftmesh.cli.main import main\n"
    "main(sys.argv[1:], prog_name='mesh')\n"
)


def _mesh(
    *args: str, code: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    head = ["-c", code] if code else ["-m", "raftmesh.cli"]
    env = {**os.environ, "RAFTMESH_BENCH_POSTGRES_URL": PG_URL}
    return subprocess.run(
        [sys.executable, *head, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.slow
def test_every_scenario_runs_in_smoke_mode_and_saves_numbers(tmp_path: Path) -> None:
    done = _mesh("bench", "all", "--smoke", "--out", str(tmp_path), timeout=300)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for scenario in SCENARIOS:
        data = json.loads((tmp_path / f"{scenario}.json").read_text())
        values = [f["value"] for f in data["figures"] if isinstance(f["value"], int | float)]
        assert values and all(math.isfinite(v) for v in values), (scenario, data["figures"])
        assert any(f["target"] for f in data["figures"]), scenario
        assert (tmp_path / f"{scenario}.png").stat().st_size > 0, scenario
        assert f"mesh bench {scenario}" in done.stdout
    short = json.loads((tmp_path / "short-runs.json").read_text())
    names = {f["name"] for f in short["figures"]}
    for peer in ("Celery+Redis", "procrastinate", "DBOS"):
        assert f"raftmesh ÷ {peer}" in names


def test_a_missing_extra_is_one_line_with_the_install_hint() -> None:
    done = _mesh("bench", "short-runs", "--smoke", code=WITHOUT_CELERY)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "pip install 'raftmesh[bench]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_raftmesh_alone_needs_no_extra() -> None:
    """--systems raftmesh passes the extra check (and then fails on the unknown
    system only if one is named)."""
    done = _mesh("bench", "short-runs", "--systems", "raftmesh,rq", code=WITHOUT_CELERY)
    assert done.returncode == 2
    assert "unknown system(s) rq" in done.stderr
    assert "raftmesh[bench]" not in done.stderr


def test_mesh_lists_bench_and_bench_lists_its_scenarios() -> None:
    assert "bench" in _mesh("--help").stdout
    help_text = _mesh("bench", "--help").stdout
    for scenario in SCENARIOS:
        assert scenario in help_text


def test_a_figure_is_judged_in_the_direction_its_target_points() -> None:
    fast = Figure("runs/s", 1500, "/s", at_least(1000, "≥ 1,000/s"))
    slow = Figure("p99", 40, "ms", at_most(20, "≤ 20 ms"))
    assert fast.ratio == 1.5 and fast.verdict is True
    assert slow.ratio == 0.5 and slow.verdict is False
    assert Figure("untargeted", 3).verdict is None
    assert Figure("unmeasured", None, target=at_least(1, "")).ratio is None


def test_without_matplotlib_the_json_is_saved_and_the_hint_printed_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = StringIO()
    result = Result("x", {}, [Figure("[odd] name", 2.0, target=at_least(1, "≥ 1"))])
    emit(result, tmp_path, Console(file=out, width=200))
    assert json.loads((tmp_path / "x.json").read_text())["figures"][0]["met"] is True
    assert not (tmp_path / "x.png").exists()
    assert "pip install 'raftmesh[bench]'" in out.getvalue()
    assert "[odd] name" in out.getvalue()


def test_the_ideal_makespan_starts_each_run_when_acknowledged_on_a_free_slot() -> None:
    # One wave: the last acknowledgement plus one run (the "submission time plus 1 s").
    assert ideal_makespan([0.0, 0.5, 3.0], slots=10, run_s=1.0) == 4.0
    # All at once on fewer slots: the waves add up.
    assert ideal_makespan([0.0] * 10, slots=3, run_s=1.0) == 4.0
    # Late arrivals find slots freed by earlier runs.
    assert ideal_makespan([0.0, 0.0, 1.5, 1.5], slots=2, run_s=1.0) == 2.5
    assert ideal_makespan([0.0, 0.0, 0.2], slots=2, run_s=1.0) == 2.0
    assert ideal_makespan([], slots=2, run_s=1.0) == 0.0
