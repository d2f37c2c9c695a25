"""Traces across services (docs/operations.md, "Traces"): W3C trace context (`traceparent`)
carried in Kafka record headers from the HTTP request through every service to each model call
(an outgoing HTTP header to the provider) and tool call (a span), exported with OpenTelemetry
only when an exporter is configured (FLEETPLANE_OTLP_ENDPOINT, FLEETPLANE_TRACE_FILE).

* `propagation`: traceparent parsing and formatting (no SDK needed).
* `tracer.Tracing`: one per process when tracing is on: loop spans (core/loop.py's
  Instruments), the traceparent of every published event, model and tool call spans.
* `setup.configure`: the SDK's TracerProvider and exporters from the settings (None when off).
* `http.instrument_app`: server spans for the ingest API (an incoming traceparent is honoured).
* `records`: the trace id of each task, recorded by accounting for `fleetplane describe`.

`trace_headers()` is what a model call adds to its HTTP request: {} when tracing is off.
"""

from __future__ import annotations

from fleetplane.tracing.propagation import trace_headers

__all__ = ["trace_headers"]
