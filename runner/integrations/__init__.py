"""Agents written with other frameworks, run durably on the mesh.

Each integration needs its framework, an optional extra of the distribution;
importing one without it raises ExtraMissing, whose message is the one line
that says what to install. The registry loads the built-in agents of an
integration only when its extra is installed (runner/registry.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from raftmesh.runner.context import RunError


class ExtraMissing(ImportError):
    """An integration's framework is not installed."""

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(f"{module} is not installed: pip install 'raftmesh[{extra}]'")
        self.extra = extra


def require(extra: str, module: str) -> ModuleType:
    """Import ``module`` of the ``extra`` extra, or raise ExtraMissing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExtraMissing(extra, module.split(".")[0]) from exc


def resolve(reference: str) -> Any:
    """The object ``module:attr`` (``attr`` may be dotted) names; RunError if
    there is none, since another attempt would not find it either."""
    module_name, _, path = reference.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for part in path.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as exc:
        raise RunError(f"cannot load {reference!r}: {exc}") from exc
    return value
