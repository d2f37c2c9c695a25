"""W3C trace context (https://www.w3.org/TR/trace-context/): the `traceparent` header value.

Works with the OpenTelemetry API alone (no SDK): when tracing is off nothing here is called."""

from __future__ import annotations

import re

from opentelemetry import trace
from opentelemetry.trace import SpanContext

TRACEPARENT = "traceparent"
_FORMAT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

#: set by tracing.setup.configure: trace_headers() returns {} while it is False
enabled = False


def format_traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def trace_id_of(traceparent: str | bytes | None) -> str | None:
    """The trace id (32 hex digits) of a valid traceparent value, else None."""
    if traceparent is None:
        return None
    value = traceparent.decode("ascii", "replace") if isinstance(traceparent, bytes) \
        else traceparent
    m = _FORMAT.match(value.strip().lower())
    if m is None or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
        return None
    return m.group(2)


def current_traceparent() -> str | None:
    """The traceparent of the current span (this thread's, or this asyncio task's), if any."""
    ctx = trace.get_current_span().get_span_context()
    return format_traceparent(ctx) if ctx.is_valid else None


def trace_headers() -> dict[str, str]:
    """HTTP headers for an outgoing call made inside a traced record (a model call): the
    current span's traceparent; {} when tracing is off or no span is current."""
    if not enabled:
        return {}
    value = current_traceparent()
    return {TRACEPARENT: value} if value else {}
