"""The seeded schedule, the run's configuration and the unsafe switch's guard."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from raftmesh.chaos.harness import ChaosConfig, ChaosError
from raftmesh.chaos.nemesis import ALL_KINDS, plan
from raftmesh.cli.main import main
from raftmesh.consensus.raft import _DialNode
from raftmesh.mesh.settings import (
    UNSAFE_FENCING_ACK,
    UNSAFE_FENCING_ACK_ENV,
    Settings,
    SettingsError,
)

KINDS = ALL_KINDS


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    assert plan(7, 120, 5, KINDS) == plan(7, 120, 5, KINDS)
    assert plan(7, 120, 5, KINDS) != plan(8, 120, 5, KINDS)


@pytest.mark.parametrize("seed", range(10))
def test_every_kind_is_scheduled_in_a_ci_smoke_and_faults_never_overlap(seed: int) -> None:
    schedule = plan(seed, 90, 3, KINDS)
    assert {f.kind for f in schedule} == set(KINDS)
    for a, b in zip(schedule, schedule[1:], strict=False):
        assert a.at_s + a.hold_s < b.at_s
    assert schedule[-1].at_s + schedule[-1].hold_s <= 90


def test_config_refuses_unknown_faults_small_meshes_db_faults_without_postgres_bad_waits() -> None:
    base = ChaosConfig(out=Path("x"), storage="postgresql://u@h/db")
    with pytest.raises(ChaosError, match="unknown fault kinds"):
        dataclasses.replace(base, faults=("kill", "flood"))
    with pytest.raises(ChaosError, match="at least 3 peers"):
        dataclasses.replace(base, peers=2)
    with pytest.raises(ChaosError, match="needs PostgreSQL"):
        dataclasses.replace(base, storage="sqlite:///x.db", faults=("db",))
    with pytest.raises(ChaosError, match="suspend_after_s"):
        dataclasses.replace(base, suspend_after_s=-1)


def test_cli_rejects_a_negative_suspend_after(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["chaos", "run", "--suspend-after", "-1", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "suspend_after_s must be" in result.output


def test_cli_reports_a_bad_fault_kind_as_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["chaos", "run", "--faults", "kill,meteor", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "unknown fault kinds ['meteor']" in result.output


def test_unsafe_disable_fencing_is_refused_without_the_acknowledgement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(UNSAFE_FENCING_ACK_ENV, raising=False)
    with pytest.raises(SettingsError, match="stale owners"):
        Settings.load({"unsafe_disable_fencing": "true"})
    monkeypatch.setenv(UNSAFE_FENCING_ACK_ENV, "yes")
    with pytest.raises(SettingsError, match=UNSAFE_FENCING_ACK):
        Settings.load({"unsafe_disable_fencing": True})
    monkeypatch.setenv(UNSAFE_FENCING_ACK_ENV, UNSAFE_FENCING_ACK)
    assert Settings.load({"unsafe_disable_fencing": "true"}).unsafe_disable_fencing
    assert not Settings.load({}).unsafe_disable_fencing


def test_dial_overrides_parse_and_keep_the_advertised_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESH_DIAL", "127.0.0.1:7002=127.0.0.1:17002,127.0.0.1:8002=127.0.0.1:18002")
    settings = Settings.load({})
    assert settings.dial_addr("127.0.0.1:8002") == "127.0.0.1:18002"
    assert settings.dial_addr("127.0.0.1:8003") == "127.0.0.1:8003"
    with pytest.raises(SettingsError, match="HOST:PORT=HOST:PORT"):
        Settings.load({"dial": {"127.0.0.1:7002": "nowhere"}})
    node = _DialNode("127.0.0.1:7002", "127.0.0.1:17002")
    # pysyncobj matches the announced address and orders dialling by it...
    assert node.address == node.id == "127.0.0.1:7002"
    # ...but connects to node.ip:node.port.
    assert (node.ip, node.port) == ("127.0.0.1", 17002)


def test_the_peer_command_does_not_load_the_harness() -> None:
    """Production code never imports chaos/: `mesh up` loads cli.main only."""
    code = "import sys, cli.main; print(sorted(m for m in sys.modules if m.startswith('chaos')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
