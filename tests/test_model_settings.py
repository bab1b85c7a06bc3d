"""The ``models`` setting: named endpoints from TOML, MESH_MODELS or the older
MESH_CHAT_* variables, checked as strictly as every other setting, and never
holding a key itself. The ``rate_limits`` setting: named limits from
MESH_RATE_LIMITS or TOML, typed, with an error that says what is wrong for
every bad spec; and the model endpoints that name them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raftmesh.mesh.settings import Settings, SettingsError
from raftmesh.runner.models import ModelEndpoint
from raftmesh.runner.rate_limits import RateLimit


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


def test_the_environment_names_rates_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_RATE_LIMITS", "openai=500rpm:200000tpm, local=20concurrent")
    settings = Settings.load({})
    assert settings.rate_limits == {
        "openai": RateLimit(rpm=500, tpm=200_000),
        "local": RateLimit(concurrent=20),
    }


def test_toml_takes_a_spec_string_specs_by_name_or_tables(tmp_path: Path) -> None:
    assert load(tmp_path, 'rate_limits = "a=2.5rpm"').rate_limits == {"a": RateLimit(rpm=2.5)}
    by_name = load(
        tmp_path,
        '[rate_limits]\nopenai = "500rpm:200000tpm:8concurrent"\nlocal = { concurrent = 20 }\n',
    )
    assert by_name.rate_limits == {
        "openai": RateLimit(rpm=500, tpm=200_000, concurrent=8),
        "local": RateLimit(concurrent=20),
    }


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("openai", "is not NAME=SPEC"),
        ("openai=500", "'500' is not NUMBERrpm, NUMBERtpm or NUMBERconcurrent"),
        ("openai=500rps", "'500rps' is not NUMBERrpm"),
        ("openai=0rpm", "rpm must be a positive number"),
        ("openai=1rpm", "rpm must be at least 2, got 1"),
        ("openai=5rpm:6rpm", "rpm is given twice"),
        ("local=2.5concurrent", "concurrent must be a whole number"),
        ("local=0concurrent", "concurrent must be a whole number >= 1"),
        ("a=1rpm,a=2rpm", "'a' is defined twice"),
        ("bad name=1rpm", "rate limit name 'bad name'"),
        ("openai=", "'' is not NUMBERrpm"),
    ],
)
def test_a_bad_spec_is_an_error_naming_the_limit_and_the_part(
    monkeypatch: pytest.MonkeyPatch, spec: str, says: str
) -> None:
    monkeypatch.setenv("MESH_RATE_LIMITS", spec)
    with pytest.raises(SettingsError, match="setting rate_limits") as err:
        Settings.load({})
    assert says in str(err.value)


def test_a_table_with_an_unknown_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"rate limit local: unknown keys \['rps'\]"):
        load(tmp_path, "[rate_limits]\nlocal = { rps = 3 }\n")


def test_a_model_endpoint_names_a_defined_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load(
        tmp_path,
        'rate_limits = "hosted=60rpm"\n[models.big]\nbase_url = "https://api.example.com/v1"\n'
        'model = "big"\nrate_limit = "hosted"\n',
    )
    assert settings.models["big"].rate_limit == "hosted"
    with pytest.raises(SettingsError, match=r"models.big.rate_limit names 'elsewhere'"):
        load(
            tmp_path,
            '[models.big]\nbase_url = "https://api.example.com/v1"\nmodel = "big"\n'
            'rate_limit = "elsewhere"\n',
        )
    monkeypatch.setenv("MESH_CHAT_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("MESH_CHAT_MODEL", "m")
    monkeypatch.setenv("MESH_CHAT_RATE_LIMIT", "local")
    monkeypatch.setenv("MESH_RATE_LIMITS", "local=2concurrent")
    assert Settings.load({}).models["default"].rate_limit == "local"


def test_the_lease_outlives_the_heartbeat_that_renews_it() -> None:
    with pytest.raises(SettingsError, match="rate_limit_lease_s must exceed"):
        Settings(rate_limit_lease_s=0.5, heartbeat_interval_s=0.5)
