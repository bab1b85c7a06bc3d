"""The ``bench`` extra: the comparison systems are optional dependencies.

A scenario that needs one imports it through ``require`` so that a missing
package ends the command with one line that says what to install, never a
traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import click

HINT = "pip install 'raftmesh[bench]'"


class ExtraMissing(click.ClickException):
    """A package of the ``bench`` extra is not installed."""

    exit_code = 2

    def __init__(self, modules: list[str], advice: str = "") -> None:
        names = ", ".join(modules)
        verb = "is" if len(modules) == 1 else "are"
        super().__init__(f"{names} {verb} not installed (the bench extra): {HINT}{advice}")


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExtraMissing([module.split(".")[0]]) from exc


def missing(modules: tuple[str, ...]) -> list[str]:
    """The top-level packages among ``modules`` that cannot be imported."""
    absent = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(module.split(".")[0])
    return absent
