"""Traces over OpenTelemetry, when asked for: install ``raftmesh[otel]`` and set
``OTEL_EXPORTER_OTLP_ENDPOINT`` (the standard OTEL_* variables configure the
exporter), and every peer sends its spans to that collector.

A run's trace is the trace of the request that submitted it: the submit span's
W3C ``traceparent`` is a field of the run's spec (``RunSpec.trace_parent``), so
it is replicated with the run and kept in storage. Every peer the run is
assigned to, the one that takes it over after its owner died too, opens its
spans under that parent: a run that failed over is one trace holding every
owner's assignment and attempt, each attempt with its steps, checkpoint writes
and a chat agent's model and tool calls.

The HTTP server and client and asyncpg are traced by the official
instrumentations. The client and asyncpg spans are kept only inside a trace
(their tracer samples no root span): a peer's heartbeats and storage polls,
which belong to no request, would otherwise each be a trace of its own; and a
peer's untraced internal calls carry an unsampled ``traceparent``, so the
server they reach drops its span of them too.

Without the extra or the variable, every call here is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from raftmesh.consensus import commands
from raftmesh.consensus.results import Assigned, Finished, Result
from raftmesh.consensus.state import MeshState
from raftmesh.mesh import logs
from raftmesh.runner.attempt import FAILED, RETRY, TIMED_OUT, Assignment, Outcome

log = logging.getLogger("raftmesh.tracing")

# What marks an attempt's span failed; fenced and released attempts did not fail.
_FAILED_OUTCOMES = frozenset({FAILED, TIMED_OUT, RETRY})

_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()


class Tracing:
    """The peer's tracer; also the runner's ``Spans`` (runner.spans)."""

    def __init__(self, peer_id: str, provider: Any = None) -> None:
        """``provider`` (an SDK TracerProvider, e.g. with an in-memory
        exporter) replaces the OTLP set-up from the environment, and leaves
        the global instrumentations alone."""
        self.peer_id = peer_id
        self._provider: Any = provider
        self._tracer: Any = None
        if provider is None:
            self._provider = _provider_from_env(peer_id)
        if self._provider is not None:
            self._tracer = self._provider.get_tracer("raftmesh")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, attributes: Mapping[str, Any]) -> AbstractContextManager[Any]:
        """A child of the current span (a root if there is none), current
        while the block runs; an exception leaving the block marks it failed."""
        if self._tracer is None:
            return _NO_SPAN
        return self._tracer.start_as_current_span(name, attributes=self._attributes(attributes))

    @contextlib.contextmanager
    def run_span(
        self, name: str, trace_parent: str | None, attributes: Mapping[str, Any]
    ) -> Iterator[None]:
        """A span in a run's trace, under the context its spec carries (the
        submit span), current while the block runs; the log lines written
        meanwhile carry that trace id. An attempt is one (traced_attempt);
        so is a signal to a run (``raftmesh.run.signal``, for the signal
        endpoint, which is not in this tree yet)."""
        if self._tracer is None:
            yield
            return
        parent = _context_of(trace_parent)
        with self._tracer.start_as_current_span(
            name, context=parent, attributes=self._attributes(attributes)
        ) as span:
            token = logs.trace_id.set(format(span.get_span_context().trace_id, "032x"))
            try:
                yield
            finally:
                logs.trace_id.reset(token)

    def record(
        self,
        name: str,
        trace_parent: str | None,
        start_ns: int,
        attributes: Mapping[str, Any],
    ) -> None:
        """A span of a run's trace that ends now, for work that began
        elsewhere (an assignment, proposed by the leader)."""
        if self._tracer is None:
            return
        span = self._tracer.start_span(
            name,
            context=_context_of(trace_parent),
            attributes=self._attributes(attributes),
            start_time=start_ns,
        )
        span.end(end_time=time.time_ns())

    def assigned(self, cmds: list[Any], results: list[Result], state: MeshState) -> None:
        """A span in the run's trace for each assignment to this peer in a
        batch it applied (commands in wire form): from the leader's proposal,
        the command's time, until this owner applied it."""
        if self._tracer is None:
            return
        now_ns = time.time_ns()
        for cmd, result in zip(cmds, results, strict=False):
            proposed_ns = min(int(cmd["at_ms"]) * 1_000_000, now_ns)
            if isinstance(result, Finished):
                # The finish of another run handed this one its slot.
                run = state.runs.get(result.handed_off)
                if run is not None and run.owner == self.peer_id:
                    attributes = {"run_id": run.id, "owner": run.owner, "epoch": run.epoch}
                    self.record(
                        "raftmesh.run.assign", run.spec.trace_parent, proposed_ns, attributes
                    )
                continue
            if not isinstance(result, Assigned) or cmd.get("op") != commands.Op.ASSIGN:
                continue
            accepted = set(result.accepted)
            for item in cmd["batch"]:
                # Apply accepted only well-formed items; a batch may hold others.
                if not (isinstance(item, list | tuple) and len(item) == 3):
                    continue
                run_id, owner, epoch = item
                run = (
                    state.runs.get(run_id)
                    if isinstance(run_id, str) and run_id in accepted
                    else None
                )
                if owner != self.peer_id or run is None:
                    continue
                attributes = {"run_id": run_id, "owner": owner, "epoch": epoch, "term": cmd["term"]}
                self.record("raftmesh.run.assign", run.spec.trace_parent, proposed_ns, attributes)

    def annotate(self, **attributes: Any) -> None:
        """Attributes learnt on the way (the run id a submission got)."""
        if self._tracer is None:
            return
        from opentelemetry import trace

        trace.get_current_span().set_attributes(_prefixed(attributes))

    def failed(self, message: str) -> None:
        """The current span's work failed without an exception (an
        attempt's outcome)."""
        if self._tracer is None:
            return
        from opentelemetry import trace

        trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, message))

    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` of the current span: what a run carries."""
        if self._tracer is None:
            return None
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        return carrier.get("traceparent")

    def _attributes(self, attributes: Mapping[str, Any]) -> dict[str, Any]:
        return {**_prefixed(attributes), "raftmesh.peer": self.peer_id}

    def close(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


async def traced_attempt(
    tracing: Tracing, job: Assignment, attempt: Callable[[], Awaitable[Outcome]]
) -> Outcome:
    """An attempt in its run's trace (the context its spec carries), whichever
    peer runs it: a run taken over after its owner died stays one trace. The
    agent's task inherits the span, so its steps are children of it."""
    attributes = {"run_id": job.run_id, "epoch": job.epoch, "attempt": job.attempt}
    with tracing.run_span("raftmesh.attempt", job.spec.trace_parent, attributes):
        outcome = await attempt()
        tracing.annotate(outcome=outcome.status, error=outcome.error)
        if outcome.status in _FAILED_OUTCOMES:
            tracing.failed(outcome.error or outcome.status)
    return outcome


def _prefixed(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {f"raftmesh.{k}": v for k, v in attributes.items() if v is not None}


def _context_of(trace_parent: str | None) -> Any:
    """The context a ``traceparent`` names; a fresh root context without one
    (a run submitted while tracing was off), never the caller's."""
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if trace_parent is None:
        return Context()
    return TraceContextTextMapPropagator().extract({"traceparent": trace_parent}, Context())


def _provider_from_env(peer_id: str) -> Any:
    """The OTLP provider, with the aiohttp and asyncpg instrumentations
    installed; None when tracing is off or the extra is missing."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
        from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
    except ImportError as exc:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but %s is not installed: "
            "pip install 'raftmesh[otel]'; no traces are sent",
            exc.name,
        )
        return None
    resource = Resource.create(
        {"service.name": "raftmesh", "service.instance.id": peer_id, "raftmesh.peer": peer_id}
    )
    processor = BatchSpanProcessor(OTLPSpanExporter())
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    # Same exporter, but no trace of its own: see the module docstring.
    within_traces = TracerProvider(
        resource=resource, sampler=ParentBased(root=ALWAYS_OFF), shutdown_on_exit=False
    )
    within_traces.add_span_processor(processor)
    AioHttpServerInstrumentor().instrument(tracer_provider=provider)
    AioHttpClientInstrumentor().instrument(tracer_provider=within_traces)
    AsyncPGInstrumentor().instrument(tracer_provider=within_traces)
    log.info("sending traces to %s", endpoint)
    return provider
