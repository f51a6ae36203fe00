"""The one module that imports opentelemetry: stall spans, victims' span events, and the
OpenTelemetry metrics, all fed by what loopwatch already records.

Imported only when the middleware starts and finds OpenTelemetry in use (``start``): with no
OpenTelemetry, nothing here is loaded and nothing costs.

- A stall in a traced request becomes a ``loopwatch.stall`` span, a child of the span that was
  active in the request when the watchdog saw the stall (Python 3.12+: read from the blocking
  task's context; 3.10/3.11: the span active when the request entered the middleware), with
  the stall's own start and end. A stall outside requests is a root span.
- Every other traced request in flight gets a ``loopwatch.blocked`` event on its span (the one
  active when it entered the middleware), as soon as the loop is free again.
- Metrics are observable instruments that read the aggregates at collection time; the stall
  histogram is recorded once per stall, the lag histogram from the heartbeat's values, on the
  watchdog thread.
"""

from __future__ import annotations

import collections
import contextvars
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Tracer

from loopwatch.requests import HAS_TASK_CONTEXT, RequestRecord
from loopwatch.stall import BACKGROUND, Stall
from loopwatch.stats import LAG_BUCKETS, STALL_BUCKETS, StatsBook

__all__ = ["EVENT_NAME", "SPAN_NAME", "OtelBridge", "is_real_provider", "start"]

SPAN_NAME = "loopwatch.stall"
EVENT_NAME = "loopwatch.blocked"
SCOPE = "loopwatch"


def is_real_provider(provider: Any) -> bool:
    """An SDK (or other implementation's) provider, not the API's no-op or proxy default."""
    return provider is not None and not type(provider).__module__.startswith(
        ("opentelemetry.trace", "opentelemetry.metrics")
    )


def _context_var() -> contextvars.ContextVar[Any] | None:
    """The ContextVar holding the OpenTelemetry context, when the default contextvars runtime
    is used: reading it is one C call per request, and the watchdog can read it from a task's
    context (3.12+)."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    return var if isinstance(var, contextvars.ContextVar) else None


def _method(method: str) -> str | None:
    """loopwatch's method label as ``http.request.method`` (semantic conventions)."""
    if method == "-":
        return None
    return "_OTHER" if method == "OTHER" else method


def _code_attributes(culprit: str) -> dict[str, Any]:
    """``path:line in function`` as the semantic conventions' code attributes."""
    where, sep, function = culprit.rpartition(" in ")
    path, colon, line = where.rpartition(":")
    if not sep or not colon or not line.isdigit():
        return {}
    return {"code.file.path": path, "code.line.number": int(line), "code.function.name": function}


class OtelMetrics:
    """loopwatch's figures on one MeterProvider, read from one StatsBook."""

    def __init__(self, provider: Any, meter: Meter, book: StatsBook) -> None:
        self.provider = provider
        self.book = book
        self.stall = _histogram(
            meter, "loopwatch.stall.duration", STALL_BUCKETS,
            "Event loop stalls by the route whose code held the loop.",
        )  # fmt: skip
        self.lag = _histogram(
            meter, "loopwatch.event_loop.lag", LAG_BUCKETS,
            "How late each event loop heartbeat woke up.",
        )  # fmt: skip
        meter.create_observable_counter(
            "loopwatch.event_loop.busy_time", [self._busy], unit="s",
            description="Time the event loop thread ran code, by the route it ran for.",
        )  # fmt: skip
        meter.create_observable_up_down_counter(
            "loopwatch.requests.in_flight", [self._in_flight], unit="{request}",
            description="Requests being served right now.",
        )  # fmt: skip
        for index, (name, unit, description) in enumerate(_POOL):
            meter.create_observable_gauge(
                f"loopwatch.threadpool.{name}", [self._pool(index)], unit=unit,
                description=description,
            )  # fmt: skip

    def _busy(self, options: CallbackOptions) -> Iterable[Observation]:
        busy = self.book.totals().busy or {}
        return [Observation(seconds, _route_attributes(*key)) for key, seconds in busy.items()]

    def _in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        if not self.book.request_metrics:  # only counted with request metrics on
            return []
        return [Observation(self.book.totals().in_flight)]

    def _pool(self, index: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            pool = self.book.totals().threadpool
            return [] if pool is None else [Observation(pool[index])]

        return observe


_POOL = (
    ("size", "{thread}", "Threads anyio's default threadpool may run."),
    ("busy_threads", "{thread}", "Threadpool threads busy right now."),
    ("waiting_tasks", "{task}", "Tasks waiting for a free threadpool thread."),
)


def _histogram(meter: Meter, name: str, bounds: Sequence[float], description: str) -> Histogram:
    try:  # the same buckets as the Prometheus histogram (API >= 1.23)
        return meter.create_histogram(
            name, unit="s", description=description,
            explicit_bucket_boundaries_advisory=list(bounds),
        )  # fmt: skip
    except TypeError:
        return meter.create_histogram(name, unit="s", description=description)


def _route_attributes(method: str, route: str) -> dict[str, str]:
    attributes = {"http.route": route}
    otel_method = _method(method)
    if otel_method is not None:
        attributes["http.request.method"] = otel_method
    return attributes


# one set of instruments per (MeterProvider, StatsBook): instruments cannot be unregistered,
# and every app built in a test suite would otherwise add its own
_instruments: weakref.WeakKeyDictionary[StatsBook, list[OtelMetrics]] = weakref.WeakKeyDictionary()


def _metrics_for(provider: Any, book: StatsBook) -> OtelMetrics:
    known = _instruments.setdefault(book, [])
    for metrics in known:
        if metrics.provider is provider:
            return metrics
    from loopwatch.version import __version__

    metrics = OtelMetrics(provider, provider.get_meter(SCOPE, __version__), book)
    known.append(metrics)
    return metrics


class OtelBridge:
    """What one monitor hands to OpenTelemetry. ``tracer`` or ``metrics`` may be None (that
    signal has no real provider)."""

    def __init__(self, tracer: Tracer | None, metrics: OtelMetrics | None) -> None:
        self.tracer = tracer
        self.metrics = metrics
        self.tracing = tracer is not None
        self._var = _context_var()
        # per request (tracing on): the OTel context as the request enters the middleware
        self.capture: Callable[[], object] | None = None
        if tracer is not None:
            self.capture = self._var.get if self._var is not None else otel_context.get_current

    # -- watchdog thread ----------------------------------------------------------------

    def context_of(self, task: Any, record: RequestRecord | None) -> object:
        """The OTel context of the request a blocking task runs for, as it is now (3.12+:
        the task's own, so a span the handler opened is the parent), else as captured when
        the request entered the middleware. None outside requests: a root span."""
        if record is None or not self.tracing:
            return None
        if HAS_TASK_CONTEXT and self._var is not None and task is not None:
            try:
                current = task.get_context().get(self._var)
                if trace.get_current_span(current).get_span_context().is_valid:
                    return current
            except Exception:
                pass
        return record.trace

    def stall_fields(self, context: object) -> dict[str, Any]:
        """Stall fields for a culprit's OTel context: the parent span context, and the hex
        ids (logs, exemplars) when that span is sampled, so they lead to a stored trace."""
        if context is None:
            return {}
        try:  # a stall is never lost to a misbehaving context or span
            parent = trace.get_current_span(context).get_span_context()  # type: ignore[arg-type]
        except Exception:
            return {}
        if not isinstance(parent, SpanContext) or not parent.is_valid:
            return {}
        if not parent.trace_flags.sampled:
            return {"span_context": parent}  # the sampler drops the stall span too
        return {
            "span_context": parent,
            "trace_id": trace.format_trace_id(parent.trace_id),
            "span_id": trace.format_span_id(parent.span_id),
        }

    def record_lag(self, tap: collections.deque[float]) -> None:
        metrics = self.metrics
        record = metrics.lag.record if metrics is not None else None
        while tap:
            value = tap.popleft()
            if record is not None:
                record(value)

    def record_stall(self, stall: Stall) -> None:
        """A delivered stall: its span (tracing on) and its histogram observation."""
        if self.metrics is not None:
            labels = _route_attributes(stall.method, stall.route)
            labels["loopwatch.stall.kind"] = stall.kind
            self.metrics.stall.record(stall.duration, labels)
        if self.tracer is None:
            return
        parent = stall.span_context
        if stall.route == BACKGROUND or not isinstance(parent, SpanContext):
            context = otel_context.Context()  # a root span, whatever this thread has current
        else:
            context = trace.set_span_in_context(NonRecordingSpan(parent))
        attributes: dict[str, Any] = {
            **_route_attributes(stall.method, stall.route),
            **_code_attributes(stall.culprit),
            "loopwatch.stall.kind": stall.kind,
            "loopwatch.stall.duration": stall.duration,
            "loopwatch.stall.cpu_seconds": stall.cpu_seconds,
            "loopwatch.requests_in_flight": stall.requests_in_flight,
        }
        if stall.stack:
            attributes["code.stacktrace"] = stall.stack
        start = int(stall.started_at * 1e9)
        span = self.tracer.start_span(
            SPAN_NAME, context=context, kind=SpanKind.INTERNAL, attributes=attributes,
            start_time=start,
        )  # fmt: skip
        span.end(end_time=start + int(stall.duration * 1e9))

    # -- loop thread --------------------------------------------------------------------

    def tell_victims(
        self,
        victims: Sequence[RequestRecord],
        *,
        method: str,
        route: str,
        culprit: str,
        duration: float,
        started_at: float,
        culprit_trace: object,
    ) -> None:
        """A ``loopwatch.blocked`` event on each victim's span: who held the loop, where, and
        for how long (measured as the loop lets go; the stall's own figure, delivered a few
        milliseconds later, may differ by about one watchdog interval)."""
        attributes: dict[str, Any] = {
            "loopwatch.stall.http.route": route,
            "loopwatch.stall.culprit": culprit,
            "loopwatch.stall.duration": duration,
        }
        otel_method = _method(method)
        if otel_method is not None:
            attributes["loopwatch.stall.http.request.method"] = otel_method
        fields = self.stall_fields(culprit_trace)
        if "trace_id" in fields:  # the culprit's trace, to jump to
            attributes["loopwatch.stall.trace_id"] = fields["trace_id"]
            attributes["loopwatch.stall.span_id"] = fields["span_id"]
        timestamp = int(started_at * 1e9)
        for victim in victims:
            span = trace.get_current_span(victim.trace)  # type: ignore[arg-type]
            if span.is_recording():
                span.add_event(EVENT_NAME, attributes, timestamp=timestamp)


def start(
    book: StatsBook, *, tracer_provider: Any = None, meter_provider: Any = None
) -> OtelBridge | None:
    """The bridge for one middleware, or None when neither signal has a real provider (the
    global one, or the one passed in)."""
    if tracer_provider is None:
        tracer_provider = trace.get_tracer_provider()
    if meter_provider is None:
        meter_provider = otel_metrics.get_meter_provider()
    tracer = None
    metrics = None
    if is_real_provider(tracer_provider):
        from loopwatch.version import __version__

        tracer = tracer_provider.get_tracer(SCOPE, __version__)
    if is_real_provider(meter_provider):
        metrics = _metrics_for(meter_provider, book)
    if tracer is None and metrics is None:
        return None
    return OtelBridge(tracer, metrics)
