"""The process's registry (loop, service and process metrics) and its scrape endpoint."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from fleetplane.core.logging import get_logger

log = get_logger(__name__)

#: Every metric of this process that is not an HTTP app's own (core/loop.py's loops, the
#: service's gauges, CPU and memory); served on the service's metrics port, or beside the app's
#: registry on its HTTP /metrics (ingest, accounting).
PROCESS = CollectorRegistry()
ProcessCollector(registry=PROCESS)  # process_cpu_seconds_total, process_resident_memory_bytes
PlatformCollector(registry=PROCESS)


def serve(host: str, port: int, registry: CollectorRegistry = PROCESS) -> Any | None:
    """GET /metrics on host:port in a daemon thread (prometheus_client's server). Port 0: off.
    A port that cannot be bound is logged, not fatal: metrics are not worth a service."""
    if port <= 0:
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("metrics port not bound; no metrics served", port=port, error=str(exc))
        return None
    log.info("metrics served", url=f"http://{host}:{port}/metrics")
    return server
