"""Traces of decisions (OpenTelemetry), on only when ``NBO_OTLP_ENDPOINT`` is set.

Each decision request is a ``decision`` span (attributes: channel, result, number of
offers, model version, decision id, request id) with the children ``key check`` (the API
key), ``ranking`` (the engine's policy and scoring work) and ``audit commit`` (the wait
for the audit row to be durable). Spans carry no customer id, no key, no exception
message (a problem's message may name the customer): a failure is its ``error.type``.

Off (the default), nothing of OpenTelemetry is imported and a decision costs one test of
:data:`tracer`. On, the lifespan calls :func:`start` (a batch processor exporting over
OTLP/HTTP in the background) and :func:`shutdown` (flush) on its way out; a test installs
its own provider with :func:`configure`. The provider is this module's, never the global
one: FastAPI traces every request with the global provider, path (and so customer id)
included.

Tracing never breaks a decision: its own failures are swallowed, and logged once.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from service import logs
from service.errors import Problem

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("nbo.tracing")

tracer: Tracer | None = None
"""The tracer of decisions, None when tracing is off: the one test a decision makes."""

SERVICE_NAME = "nbo"
"""The service name of the spans unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES)
names another."""

_provider: TracerProvider | None = None
_in_context: Any = None  # opentelemetry.trace.set_span_in_context, once tracing is on
_failed = False


def start(endpoint: str) -> None:
    """Trace decisions to the OTLP/HTTP traces endpoint ``endpoint``
    (e.g. ``http://collector:4318/v1/traces``), exported in batches in the background.

    An unreachable collector costs the exporter thread retries, never a decision.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME as NAME_KEY
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; without
    # either it says "unknown_service:<python>".
    resource = Resource.create()
    if str(resource.attributes.get(NAME_KEY, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({NAME_KEY: SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    configure(provider)
    log.info("tracing decisions", extra={"endpoint": endpoint})


def configure(provider: TracerProvider | None) -> None:
    """Trace decisions with ``provider`` from now on (None: stop tracing, without
    shutting the provider down)."""
    global tracer, _provider, _in_context
    if provider is None:
        tracer = _provider = None
        return
    from opentelemetry.trace import set_span_in_context

    _in_context = set_span_in_context
    _provider = provider
    tracer = provider.get_tracer("nbo.decisions")


def shutdown() -> None:
    """Stop tracing, and export the spans still queued (the provider's shutdown)."""
    global tracer, _provider
    provider = _provider
    tracer = _provider = None
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:  # noqa: BLE001 - a worker on its way out must still exit
            log.warning("trace provider shutdown failed", exc_info=True)


def _failure() -> None:
    """Note a failure of tracing itself: logged with its traceback the first time only
    (it would repeat on every decision)."""
    global _failed
    if not _failed:
        _failed = True
        log.warning("tracing failed; decisions go on untraced where it fails", exc_info=True)


def _mark_failed(span: Span, error: BaseException) -> None:
    """Say on ``span`` that ``error`` ended its work: its type only. A problem below 500
    (a bad key, an unknown customer) is the caller's, not an error of the service."""
    span.set_attribute("error.type", type(error).__name__)
    if not isinstance(error, Problem) or error.status >= 500:
        from opentelemetry.trace import StatusCode

        span.set_status(StatusCode.ERROR)


class DecisionTrace:
    """The spans of one decision request: opened with its ``decision`` span, stages
    timed with :meth:`stage`, facts added with :meth:`note`, closed with :meth:`end`."""

    __slots__ = ("_tracer", "_span", "_context")

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._span: Span | None = None
        self._context: Any = None
        try:
            span = tracer.start_span("decision")
            request_id = logs.current_request_id()
            if request_id is not None:
                span.set_attribute("nbo.request_id", request_id)
            self._context = _in_context(span)
            self._span = span
        except Exception:  # noqa: BLE001 - never break a decision
            _failure()

    def stage(self, name: str) -> _Stage:
        """A context manager timing the child span ``name`` of the decision."""
        return _Stage(self, name)

    def note(self, **attributes: str | int | bool | None) -> None:
        """Set ``nbo.decision.<name>`` attributes of the decision span (None: left out)."""
        span = self._span
        if span is None:
            return
        try:
            for name, value in attributes.items():
                if value is not None:
                    span.set_attribute(f"nbo.decision.{name}", value)
        except Exception:  # noqa: BLE001 - never break a decision
            _failure()

    def end(self, error: BaseException | None = None) -> None:
        """End the decision span; ``error`` is what ended the request, if it failed."""
        span = self._span
        if span is None:
            return
        self._span = None
        try:
            if error is not None:
                _mark_failed(span, error)
            span.end()
        except Exception:  # noqa: BLE001 - never break a decision
            _failure()


_UNTRACED = contextlib.nullcontext()


def stage(trace: DecisionTrace | None, name: str) -> AbstractContextManager[object]:
    """:meth:`DecisionTrace.stage` of ``trace``, or a shared no-op context when the
    decision is not traced (one object, nothing made per decision)."""
    return _UNTRACED if trace is None else trace.stage(name)


class _Stage:
    """One child span of a decision, opened and ended as a context manager."""

    __slots__ = ("_trace", "_name", "_span")

    def __init__(self, trace: DecisionTrace, name: str) -> None:
        self._trace = trace
        self._name = name
        self._span: Span | None = None

    def __enter__(self) -> None:
        trace = self._trace
        if trace._context is None:
            return
        try:
            self._span = trace._tracer.start_span(self._name, context=trace._context)
        except Exception:  # noqa: BLE001 - never break a decision
            _failure()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        span = self._span
        if span is None:
            return
        try:
            if error is not None:
                _mark_failed(span, error)
            span.end()
        except Exception:  # noqa: BLE001 - never break a decision
            _failure()
