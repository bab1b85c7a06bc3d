"""Traces over OpenTelemetry, when asked for: install ``raftmesh[otel]`` and set
``OTEL_EXPORTER_OTLP_ENDPOINT`` (the standard OTEL_* variables configure the
exporter), and every peer sends its spans to that collector.

A run's trace id is its id (32 hex digits, as W3C wants), so the spans every
peer writes for one run (the submission where it arrived, each owner's claim,
steps and checkpoint writes under their epochs, the result) form one trace
with no context to carry between peers, and match the ``trace_id`` of the
run's log lines. Without the extra or the variable, every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import random
import re
from typing import Any

log = logging.getLogger("raftmesh.tracing")

_HEX32 = re.compile(r"^[0-9a-f]{32}$")


class Tracing:
    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self._tracer: Any = None
        self._provider: Any = None
        self._trace: Any = None
        if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            return
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
                "pip install 'raftmesh[otel]'; no traces are sent"
            )
            return
        resource = Resource.create(
            {"service.name": "raftmesh", "service.instance.id": peer_id, "raftmesh.peer": peer_id}
        )
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._tracer = self._provider.get_tracer("raftmesh")
        self._trace = trace
        log.info("sending traces to %s", os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def record(
        self,
        name: str,
        run_id: str,
        start_ns: int,
        end_ns: int,
        error: str | None = None,
        **attributes: Any,
    ) -> None:
        """One finished span in the run's trace; times are ``time.time_ns()``."""
        if self._tracer is None:
            return
        attrs = {f"raftmesh.{k}": v for k, v in attributes.items() if v is not None}
        attrs["raftmesh.run_id"] = run_id
        attrs["raftmesh.peer"] = self.peer_id
        span = self._tracer.start_span(
            name, context=self._run_context(run_id), attributes=attrs, start_time=start_ns
        )
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end(end_time=end_ns)

    def _run_context(self, run_id: str) -> Any:
        """Every span of a run hangs under one parent all peers derive alike
        from the run id (a virtual root: no peer owns the run for its life)."""
        trace = self._trace
        if _HEX32.match(run_id):
            trace_id, span_id = int(run_id, 16), int(run_id[16:], 16) or 1
        else:
            trace_id, span_id = random.getrandbits(128) or 1, random.getrandbits(64) or 1
        parent = trace.SpanContext(
            trace_id=trace_id,
            span_id=span_id,
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(parent))

    def close(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
