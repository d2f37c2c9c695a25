"""Server spans for a FastAPI app (the ingest API): an incoming `traceparent` is the parent
(the caller's trace goes on through fleetplane), else the request starts a trace. Events the
request publishes carry the request span's context (tracing.tracer, publish hook)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from opentelemetry.trace import SpanKind, Status, StatusCode

from fleetplane.tracing.propagation import TRACEPARENT, format_traceparent
from fleetplane.tracing.tracer import Tracing, parent_context

#: requests without a traceparent that start no trace (reads, probes and scrapes)
QUIET_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def instrument_app(app: FastAPI, tracing: Tracing) -> None:
    @app.middleware("http")
    async def trace_request(request: Request,
                            call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        incoming = request.headers.get(TRACEPARENT)
        if incoming is None and request.method in QUIET_METHODS:
            return await call_next(request)
        with tracing.tracer.start_as_current_span(
                f"{tracing.service} {request.method}", context=parent_context(incoming),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": request.method,
                            "url.path": request.url.path}) as span:
            response = await call_next(request)
            route = getattr(request.scope.get("route"), "path", None)
            if route:
                span.update_name(f"{tracing.service} {request.method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            # the caller learns the trace its request joined (W3C Trace Context level 2)
            response.headers["traceresponse"] = format_traceparent(span.get_span_context())
            return response
