"""The OpenTelemetry SDK for one process, from the settings; nothing at all when no exporter is
configured (FLEETPLANE_OTLP_ENDPOINT, FLEETPLANE_TRACE_FILE): no provider, no spans, no
headers, no hooks."""

from __future__ import annotations

import os
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from fleetplane.core.settings import Settings
from fleetplane.tracing import propagation
from fleetplane.tracing.tracer import Tracing


def file_exporter(path: Path) -> SpanExporter:
    """The SDK's console exporter writing one JSON span per line to `path` (appended)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives with the process)

    def line(span: ReadableSpan) -> str:
        return str(span.to_json(indent=None)) + os.linesep

    return ConsoleSpanExporter(out=out, formatter=line)


def provider_for(settings: Settings, service: str,
                 exporters: list[SpanExporter] | None = None) -> TracerProvider | None:
    """A TracerProvider exporting to what the settings name (in batches) and to `exporters`
    (each span as it ends: tests' in-memory exporter), or None."""
    chosen: list[SpanExporter] = []
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        chosen.append(OTLPSpanExporter(endpoint=endpoint))
    if settings.trace_file:
        chosen.append(file_exporter(Path(settings.trace_file.replace("{service}", service))))
    if not chosen and not exporters:
        return None
    resource = Resource.create({"service.name": f"fleetplane-{service}",
                                "service.namespace": "fleetplane",
                                "service.instance.id": settings.instance_id})
    provider = TracerProvider(resource=resource,
                              sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)))
    for exporter in chosen:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    for exporter in exporters or []:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def configure(settings: Settings, service: str,
              exporters: list[SpanExporter] | None = None) -> Tracing | None:
    """This process's Tracing, or None when tracing is off."""
    provider = provider_for(settings, service, exporters)
    if provider is None:
        return None
    propagation.enabled = True
    return Tracing(provider.get_tracer("fleetplane"), service)
