"""The spans of one process: a span per traced record a loop handles, the traceparent of every
event the process publishes, and a span per model call and tool call.

How the context travels:

* A record carries its trace context in its `traceparent` header. The loop handles it inside
  a span whose parent is that context (`<service> <EventType>`, kind consumer); a record
  without one is handled without a span, except by an entry loop (ingest's validator of raw
  submissions), where a new trace starts.
* What the handler returns is published after the handler (at the batch's commit), in another
  thread for the executor: each output event is stamped with the span's context (or, for an
  output of another task, with the context this process last saw for that task: the
  coordinator dispatches a queued task while it handles another task's event), and the publish
  hook (core/kafka.event_headers) writes it into the record's headers. A forwarded record
  (the coordinator's repartition) gets the forwarding span's context.
* Events published outside the loop (the ingest API, the executor's live events) take the
  current span's context: the HTTP request's, or the attempt's in its worker thread.
* ModelCall and ToolCall events become spans of their own when they are published (start and
  end from the call's measured latency, attributes from the event: model, tokens, cost,
  outcome; tool, outcome); the model call's HTTP request carries the attempt span's
  traceparent to the provider (`trace_headers`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fleetplane.core import events as ev
from fleetplane.core.bounded import Bounded
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import Instruments, Output, RawRecord, Record
from fleetplane.tracing.propagation import TRACEPARENT, format_traceparent, trace_id_of

log = get_logger(__name__)

PROPAGATOR = TraceContextTextMapPropagator()
#: events that get no trace context (periodic; they would bury a task's trace)
UNTRACED = frozenset({"TaskHeartbeat", "ExecutorUtilization", "BudgetStatus"})


def parent_context(traceparent: str | bytes | None) -> otel_context.Context | None:
    """The OpenTelemetry context of a traceparent header value (None if absent or invalid)."""
    if traceparent is None or trace_id_of(traceparent) is None:
        return None
    value = traceparent.decode() if isinstance(traceparent, bytes) else traceparent
    return PROPAGATOR.extract({TRACEPARENT: value})


class Tracing:
    """One per process (tracing.setup.configure). Thread-safe."""

    def __init__(self, tracer: Tracer, service: str, memory: int = 50_000) -> None:
        self.tracer = tracer
        self.service = service
        self._lock = threading.Lock()
        #: id(output event) -> (the event, traceparent): stamped by a loop, taken at publish
        self._stamped: Bounded[Any, Any] = Bounded(memory)
        #: task id -> the traceparent this process last handled or published for the task
        self._tasks: Bounded[Any, Any] = Bounded(memory)

    # -- the loop --------------------------------------------------------------------------
    def instruments(self, service: str, group: str, entry: bool = False) -> Instruments:
        return LoopTracing(self, service, entry)

    def remember(self, task_id: str, traceparent: str) -> None:
        if task_id:
            with self._lock:
                self._tasks.put(task_id, traceparent)

    def known(self, task_id: str) -> str | None:
        with self._lock:
            value: str | None = self._tasks.get(task_id)
            return value

    def stamp(self, out: Output, task_id: str, traceparent: str) -> Output:
        """An output of the record handled under `traceparent` (whose task is `task_id`)."""
        if isinstance(out, RawRecord):
            if any(k == TRACEPARENT for k, _ in out.headers):  # a forwarded record
                return replace(out, headers=tuple(
                    (k, traceparent.encode() if k == TRACEPARENT else v)
                    for k, v in out.headers))
            return out
        if type(out).__name__ in UNTRACED:
            return out
        value = traceparent if out.task_id == task_id else self.known(out.task_id)
        if value is not None:
            with self._lock:
                self._stamped.put(id(out), (out, value))
        return out

    # -- publishing (core/kafka.event_headers) ---------------------------------------------
    def publish_hook(self, event: ev.Event) -> Iterable[tuple[str, bytes]]:
        if type(event).__name__ in UNTRACED:
            return ()
        with self._lock:
            entry = self._stamped.pop(id(event), None)
        value: str | None = entry[1] if entry is not None and entry[0] is event else None
        if value is None:
            span_ctx = trace.get_current_span().get_span_context()
            value = format_traceparent(span_ctx) if span_ctx.is_valid else self.known(
                event.task_id)
        if value is None:
            return ()
        if isinstance(event, ev.ModelCall | ev.ToolCall):
            value = self._call_span(event, value)
        return ((TRACEPARENT, value.encode()),)

    def _call_span(self, event: ev.ModelCall | ev.ToolCall, parent: str) -> str:
        """A span for a model or tool call, timed by the call's own measurement; returns its
        traceparent (the event's record carries it)."""
        end_ns = int(event.occurred_at.timestamp() * 1e9)
        common: dict[str, Any] = {"fleetplane.task_id": event.task_id,
                                  "fleetplane.team": event.team,
                                  "fleetplane.attempt": event.attempt,
                                  "fleetplane.call_index": event.call_index}
        if isinstance(event, ev.ModelCall):
            name = f"model {event.model}"
            seconds = event.latency_ms / 1000
            attributes = {**common, "gen_ai.request.model": event.model,
                          "gen_ai.system": event.provider, "fleetplane.tier": event.tier,
                          "gen_ai.usage.input_tokens": event.input_tokens,
                          "gen_ai.usage.output_tokens": event.output_tokens,
                          "fleetplane.cost_usd": event.cost_usd,
                          "fleetplane.outcome": event.outcome}
            failed = event.outcome not in ("ok", "success")
            kind = SpanKind.CLIENT
        else:
            name = f"tool {event.tool}"
            seconds = event.duration_ms / 1000
            attributes = {**common, "gen_ai.tool.name": event.tool,
                          "fleetplane.outcome": event.outcome}
            failed = event.outcome not in ("ok", "success")
            kind = SpanKind.INTERNAL
        span = self.tracer.start_span(name, context=parent_context(parent), kind=kind,
                                      attributes=attributes,
                                      start_time=end_ns - int(max(0.0, seconds) * 1e9))
        if failed:
            span.set_status(Status(StatusCode.ERROR, getattr(event, "error", None) or
                                   event.outcome))
        span.end(end_time=end_ns)
        return format_traceparent(span.get_span_context())


class LoopTracing(Instruments):
    """core/loop.py's handling of one record inside a span (see the module's doc)."""

    def __init__(self, tracing: Tracing, service: str, entry: bool) -> None:
        self.tracing = tracing
        self.service = service
        self.entry = entry

    def handle(self, event: ev.Event, rec: Record, run: Callable[[], list[Output]]
               ) -> list[Output]:
        incoming = rec.headers.get(TRACEPARENT)
        parent = parent_context(incoming)
        if parent is None and not self.entry:
            return run()
        kind = type(event).__name__
        if incoming is not None and parent is None:
            log.warning("invalid traceparent header ignored", value=incoming[:80])
        with self.tracing.tracer.start_as_current_span(
                f"{self.service} {kind}", context=parent, kind=SpanKind.CONSUMER,
                attributes={"fleetplane.task_id": event.task_id, "fleetplane.team": event.team,
                            "fleetplane.event_type": kind,
                            "fleetplane.event_id": event.event_id,
                            "messaging.system": "kafka",
                            "messaging.destination.name": rec.topic,
                            "messaging.destination.partition.id": str(rec.partition),
                            "messaging.kafka.offset": rec.offset}) as span:
            started = time.perf_counter()
            ctx = span.get_span_context()
            with structlog.contextvars.bound_contextvars(trace_id=f"{ctx.trace_id:032x}"):
                outputs = run()
            span.set_attribute("fleetplane.outputs", len(outputs))
            span.set_attribute("fleetplane.handle_ms", (time.perf_counter() - started) * 1000)
            value = format_traceparent(span.get_span_context())
        self.tracing.remember(event.task_id, value)
        return [self.tracing.stamp(out, event.task_id, value) for out in outputs]

