"""`/metrics` for a FastAPI service, and the request metrics of an HTTP front door."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from fleetplane.metrics.registry import PROCESS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def mount_metrics(app: FastAPI, registry: CollectorRegistry) -> None:
    """GET /metrics: the registry in Prometheus text format (no authentication: like /healthz,
    it is for the operator's scraper on the internal network; it carries no task content).
    The process's own registry (loop and process metrics) is served beside `registry`."""

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        body = generate_latest(registry)
        if registry is not PROCESS:
            body += generate_latest(PROCESS)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def instrument_requests(app: FastAPI, registry: CollectorRegistry, service: str) -> None:
    """Count requests by route template (never the raw path: task ids would explode the label
    set), method and status, and time them."""
    requests = Counter("fleetplane_http_requests", "HTTP requests, by route, method and status",
                       ["service", "route", "method", "status"], registry=registry)
    seconds = Histogram("fleetplane_http_request_seconds", "HTTP request latency, by route",
                        ["service", "route"], buckets=LATENCY_BUCKETS, registry=registry)

    @app.middleware("http")
    async def measure(request: Request,
                      call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            if path != "/metrics":
                requests.labels(service, path, request.method, str(status)).inc()
                seconds.labels(service, path).observe(time.perf_counter() - start)
