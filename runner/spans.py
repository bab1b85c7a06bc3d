"""Where the runner opens trace spans, with no tracing library below mesh/.

OpenTelemetry is an optional extra and the runner sits below mesh/ in the
layers, so the context opens its spans (each step, a chat agent's model and
tool calls) through this one-method protocol: the peer hands in its tracer
(mesh.tracing.Tracing), and everything else runs with NO_SPANS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol


class Spans(Protocol):
    def span(self, name: str, attributes: Mapping[str, Any]) -> AbstractContextManager[Any]:
        """A span, a child of the current one, for as long as the block runs."""


class _NoSpans:
    def span(self, name: str, attributes: Mapping[str, Any]) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()


NO_SPANS: Spans = _NoSpans()
