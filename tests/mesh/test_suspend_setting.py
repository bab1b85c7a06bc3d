"""``suspend_after_s``: from a flag, MESH_SUSPEND_AFTER_S or TOML, checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from raftmesh.cli.main import main
from raftmesh.mesh.settings import Settings, SettingsError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MESH_"):
            monkeypatch.delenv(name)


def test_the_default_flag_environment_and_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().suspend_after_s == 5.0
    config = tmp_path / "mesh.toml"
    config.write_text("suspend_after_s = 30\n")
    assert Settings.load({}, str(config)).suspend_after_s == 30.0
    monkeypatch.setenv("MESH_SUSPEND_AFTER_S", "0.5")
    assert Settings.load({}, str(config)).suspend_after_s == 0.5
    assert Settings.load({"suspend_after_s": 2.0}, str(config)).suspend_after_s == 2.0


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_wait_threshold_that_is_not_a_duration_is_refused(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_SUSPEND_AFTER_S", value)
    with pytest.raises(SettingsError, match="suspend_after_s"):
        Settings.load({})


def test_mesh_up_takes_the_flag() -> None:
    result = CliRunner().invoke(main, ["up", "--help"])
    assert "--suspend-after-s" in result.output
