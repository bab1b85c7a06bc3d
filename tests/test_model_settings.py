"""The ``models`` setting: named endpoints from TOML, MESH_MODELS or the older
MESH_CHAT_* variables, checked as strictly as every other setting, and never
holding a key itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raftmesh.mesh.settings import Settings, SettingsError
from raftmesh.runner.models import ModelEndpoint


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("MESH_", "OPENAI_")):
            monkeypatch.delenv(name)


def load(tmp_path: Path, toml: str) -> Settings:
    config = tmp_path / "mesh.toml"
    config.write_text(toml)
    return Settings.load({}, str(config))


def test_model_tables_become_named_endpoints(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        'slots = 2\n[models.local]\nbase_url = "http://127.0.0.1:11434/v1/"\nmodel = "llama3.2"\n'
        '[models.hosted]\nbase_url = "https://api.example.com/v1"\nmodel = "big"\n'
        'api_key_env = "HOSTED_API_KEY"\n',
    )
    assert settings.models == {
        "local": ModelEndpoint("http://127.0.0.1:11434/v1", "llama3.2", ""),
        "hosted": ModelEndpoint("https://api.example.com/v1", "big", "HOSTED_API_KEY"),
    }


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('base_url = "http://h/v1"\nmodel = "m"\napi_key_evn = "K"', "api_key_evn"),
        ('base_url = "file:///etc/passwd"\nmodel = "m"', "http(s)"),
        ('base_url = "http://user:pw@h/v1"\nmodel = "m"', "credentials"),
        ('base_url = "http://h/v1"', "lacks model"),
        ('base_url = "http://h/v1"\nmodel = "m"\napi_key = "sk-live-0123456789"', "api_key_env"),
        ('base_url = "http://h/v1"\nmodel = "m"\napi_key_env = "sk-live-0123456789"', "NAME"),
    ],
)
def test_a_bad_model_table_is_refused_without_echoing_a_key(
    tmp_path: Path, table: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as refused:
        load(tmp_path, f"[models.x]\n{table}\n")
    assert expected in str(refused.value) and "models.x" in str(refused.value)
    assert "0123456789" not in str(refused.value)


def test_mesh_chat_variables_define_the_default_model_beside_the_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_CHAT_BASE_URL", "http://127.0.0.1:8000/v1")
    monkeypatch.setenv("MESH_CHAT_MODEL", "qwen")
    monkeypatch.setenv("MESH_CHAT_API_KEY", "the-key")
    settings = load(tmp_path, '[models.local]\nbase_url = "http://h/v1"\nmodel = "m"\n')
    assert settings.models == {
        "local": ModelEndpoint("http://h/v1", "m"),
        "default": ModelEndpoint("http://127.0.0.1:8000/v1", "qwen", "MESH_CHAT_API_KEY"),
    }
    assert "the-key" not in repr(settings), "settings name the key's variable, never the key"

    monkeypatch.delenv("MESH_CHAT_MODEL")
    with pytest.raises(SettingsError, match="MESH_CHAT_BASE_URL and MESH_CHAT_MODEL"):
        load(tmp_path, "")


def test_mesh_models_takes_the_tables_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_MODELS", '{"a": {"base_url": "https://a.example/v1", "model": "x"}}')
    assert Settings.load({}).models == {"a": ModelEndpoint("https://a.example/v1", "x")}
    monkeypatch.setenv("MESH_MODELS", "a=https://a.example/v1")
    with pytest.raises(SettingsError, match="JSON"):
        Settings.load({})
