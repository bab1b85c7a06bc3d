"""The model endpoints a peer may call, named in its settings.

A run's input may only choose one of them by name (``"model": "NAME"``); it can
never carry a URL, so a submitter cannot point the peer (and the peer's key) at
an address of their choosing. Each endpoint's key stays in the peer's
environment, in the variable ``api_key_env`` names: it is in no TOML file, no
command line, no run input and no journal, and it is sent only to the
``base_url`` configured beside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_MODEL = "default"
ENDPOINT_KEYS = ("base_url", "model", "api_key_env", "rate_limit")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ModelConfigError(ValueError):
    """A model table cannot describe a usable endpoint."""


@dataclass(frozen=True)
class ModelEndpoint:
    """``base_url`` is an OpenAI-compatible API root (``…/v1``); ``model`` is
    the model id sent to it; ``api_key_env`` names the environment variable
    holding its key ("" for a server that wants none); ``rate_limit`` names
    the mesh-wide limit its calls count against ("" for none)."""

    base_url: str
    model: str
    api_key_env: str = ""
    rate_limit: str = ""

    def __post_init__(self) -> None:
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ModelConfigError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        if url.username is not None or url.password is not None:
            raise ModelConfigError(
                "base_url must not carry credentials: put the key in an environment "
                "variable and name it in api_key_env"
            )
        if url.query or url.fragment:
            raise ModelConfigError(f"base_url must have no query or fragment: {self.base_url!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ModelConfigError("model must name the model id to request")
        if self.api_key_env and not _ENV_NAME.fullmatch(self.api_key_env):
            raise ModelConfigError(
                "api_key_env must be the NAME of an environment variable (the key itself "
                f"belongs in that variable), got {_shown(self.api_key_env)}"
            )
        if self.rate_limit and not _NAME.fullmatch(self.rate_limit):
            raise ModelConfigError(f"rate_limit must name a rate limit, got {self.rate_limit!r}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def as_dict(self) -> dict[str, str]:
        return {
            "base_url": self.base_url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "rate_limit": self.rate_limit,
        }


def parse_models(raw: Any) -> dict[str, ModelEndpoint]:
    """``{NAME: {base_url, model, api_key_env, rate_limit}}``: TOML tables ``[models.NAME]``,
    or the same as a JSON object (``MESH_MODELS``)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"models must be a JSON object of tables: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ModelConfigError("models must map names to tables of base_url, model, api_key_env")
    models: dict[str, ModelEndpoint] = {}
    for name, table in raw.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ModelConfigError(f"model name {name!r}: use letters, digits, '_', '.', '-'")
        if isinstance(table, ModelEndpoint):
            models[name] = table
            continue
        if not isinstance(table, Mapping):
            raise ModelConfigError(f"models.{name} must be a table")
        if "api_key" in table:
            raise ModelConfigError(
                f"models.{name}.api_key: keys are never written in settings; put it in an "
                "environment variable and name that variable in api_key_env"
            )
        unknown = set(table) - set(ENDPOINT_KEYS)
        if unknown:
            raise ModelConfigError(
                f"unknown keys in models.{name}: {sorted(unknown)}; known: {list(ENDPOINT_KEYS)}"
            )
        missing = [k for k in ("base_url", "model") if k not in table]
        if missing:
            raise ModelConfigError(f"models.{name} lacks {', '.join(missing)}")
        try:
            models[name] = ModelEndpoint(**{k: str(v) for k, v in table.items()})
        except ModelConfigError as exc:
            raise ModelConfigError(f"models.{name}: {exc}") from None
    return models


def env_default_model(environ: Mapping[str, str]) -> ModelEndpoint | None:
    """The ``MESH_CHAT_*`` variables of earlier releases (``OPENAI_*`` as a
    fallback), kept working as the endpoint named "default";
    ``MESH_CHAT_RATE_LIMIT`` names its rate limit."""
    base_url = environ.get("MESH_CHAT_BASE_URL") or environ.get("OPENAI_BASE_URL")
    model = environ.get("MESH_CHAT_MODEL") or environ.get("OPENAI_MODEL")
    if not base_url or not model:
        if environ.get("MESH_CHAT_BASE_URL") or environ.get("MESH_CHAT_MODEL"):
            raise ModelConfigError("MESH_CHAT_BASE_URL and MESH_CHAT_MODEL must be set together")
        return None
    key_env = next((n for n in ("MESH_CHAT_API_KEY", "OPENAI_API_KEY") if environ.get(n)), "")
    try:
        return ModelEndpoint(base_url, model, key_env, environ.get("MESH_CHAT_RATE_LIMIT", ""))
    except ModelConfigError as exc:
        raise ModelConfigError(f"MESH_CHAT_BASE_URL: {exc}") from None


def _shown(value: str) -> str:
    """Enough of a mistaken value to recognise it, not enough to leak a key."""
    return repr(value) if len(value) <= 8 else f"{value[:4]!r}… ({len(value)} characters)"
