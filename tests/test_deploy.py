"""The files in deploy/ describe peers that Settings accepts, so they cannot rot silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raftmesh.mesh.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_toml_loads_with_every_key_known():
    settings = Settings.load({"secret": "s"}, str(DEPLOY / "raftmesh.example.toml"))
    assert settings.peers == ("10.0.0.12:7001", "10.0.0.13:7001")
    assert settings.labels == {"pool": "cpu"}
    assert settings.storage.startswith("postgresql://")
    assert settings.secret == "s"
    settings.check_secret()
    assert settings.tenant_caps == {"free": 2, "pro": 10} and settings.default_tenant_cap == 4
    assert settings.replicated_policy()["tenant_max_queued"] == {"free": 100}
    assert sorted(settings.models) == ["default", "hosted"]
    assert settings.models["hosted"].api_key_env == "OPENAI_API_KEY"


def test_example_toml_without_secret_is_refused_on_real_addresses():
    settings = Settings.load({}, str(DEPLOY / "raftmesh.example.toml"))
    with pytest.raises(ValueError, match="MESH_SECRET"):
        settings.check_secret()


def mesh_env_names(text: str) -> set[str]:
    return set(re.findall(r"\bMESH_([A-Z_]+)\b", text))


@pytest.mark.parametrize("name", ["docker-compose.yml", "Dockerfile", "systemd/raftmesh.env"])
def test_environment_variables_name_real_settings(name):
    fields = {f.upper() for f in Settings.__dataclass_fields__}
    used = mesh_env_names((DEPLOY / name).read_text())
    assert used, f"{name} configures peers through MESH_* variables"
    assert used <= fields, f"{name} sets unknown variables: {sorted(used - fields)}"
