"""One namespace: what the wheel installs, and which code a user's folder can shadow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("consensus", "mesh", "runner", "storage", "cli", "chaos", "bench")


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        "raftmesh." + str(init.parent.relative_to(REPO)).replace(os.sep, ".")
        for top in TOP_LEVEL
        for init in (REPO / top).rglob("__init__.py")
    }
    assert listed == on_disk


def test_client_commands_load_neither_pysyncobj_nor_the_harnesses() -> None:
    code = (
        "import sys, raftmesh.cli.main; "
        "print(sorted(m for m in sys.modules if m.startswith("
        "('pysyncobj', 'raftmesh.chaos', 'raftmesh.bench', 'raftmesh.mesh.peer', "
        "'matplotlib', 'celery', 'procrastinate', 'dbos'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_wheel_installs_exactly_one_top_level_package(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert installed - {"bin"} == {"raftmesh"}, installed
    assert not (target / "raftmesh" / "__init__.py").exists(), "raftmesh is a namespace package"
    for top in TOP_LEVEL:
        assert (target / "raftmesh" / top / "__init__.py").exists(), top
    assert list((target / "raftmesh" / "storage" / "migrations").rglob("*.sql"))


@pytest.mark.slow
def test_mesh_dev_in_a_folder_with_its_own_cli_runs_raftmesh(tmp_path: Path) -> None:
    """A user's project may well have a cli/ (or mesh/, storage/) of its own;
    the peers ``mesh dev`` starts must not pick it up."""
    marker = tmp_path / "shadowed"
    for name in ("cli", "mesh", "storage"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r})\nraise SystemExit('shadowed')\n"
        )
    (tmp_path / "cli" / "__main__.py").write_text("import cli\n")
    dev = subprocess.Popen(
        [sys.executable, "-m", "raftmesh.cli", "dev", "--nodes", "1", "--dir", str(tmp_path / "d")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "200"},
    )
    try:
        assert dev.stdout is not None
        lines = []
        for line in dev.stdout:
            lines.append(line)
            if "mesh ready" in line or "rror" in line:
                break
        assert any("mesh ready" in line for line in lines), "".join(lines)
    finally:
        dev.send_signal(signal.SIGINT)
        out, _ = dev.communicate(timeout=60)
    assert not marker.exists(), marker.read_text()
    assert dev.returncode == 0, out
