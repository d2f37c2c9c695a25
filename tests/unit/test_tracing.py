"""Trace context through a loop (fleetplane.tracing) with the SDK's in-memory exporter: what a
record's span's parent is, which traceparent each published event carries, model call spans."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from fleetplane.core import events as ev
from fleetplane.core.kafka import event_headers
from fleetplane.core.loop import Output, Processor, RawRecord, Record, set_instruments
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.metrics.setup import Observability, instrument
from fleetplane.tracing import trace_headers
from fleetplane.tracing.propagation import trace_id_of
from fleetplane.tracing.setup import configure

CLIENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SPEC = ev.TaskSpec(name="n", task_type="summarize", prompt="p")


@pytest.fixture
def traced() -> Iterator[tuple[Observability, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    obs = instrument(Settings(), "router", registry=CollectorRegistry(), exporters=[exporter])
    assert obs.tracing is not None
    try:
        yield obs, exporter
    finally:
        obs.close()


def record(event: ev.Event, traceparent: str | None = None, topic: str = "tasks.accepted"
           ) -> Record:
    headers = {"traceparent": traceparent.encode()} if traceparent else {}
    return Record(topic, 0, 7, event.task_id.encode(), default_serde().encode(event), headers)


def header(event: ev.Event) -> str | None:
    for k, v in event_headers(event):
        if k == "traceparent":
            assert isinstance(v, bytes)
            return v.decode()
    return None


def test_a_record_is_handled_in_a_child_span_and_its_outputs_carry_that_span(
        traced: tuple[Observability, InMemorySpanExporter]) -> None:
    _obs, exporter = traced
    accepted = ev.TaskAccepted(task_id="t1", team="pay", spec=SPEC)
    routed = ev.TaskRouted(task_id="t1", team="pay", spec=SPEC, attempt=1, model="m",
                           provider="anthropic", tier="small", reason="r")
    held_other = ev.TaskHeld(task_id="t2", team="pay", reason="quota")

    def handler(event: ev.Event, rec: Record) -> list[Output]:
        return [routed, held_other,
                RawRecord("x", b"k", b"v", headers=(("traceparent", b"old"), ("a", b"b")))]

    p = Processor("router", ["tasks.accepted"], handler, Settings())
    outputs = p._handle_one(record(accepted, CLIENT))
    (span,) = exporter.get_finished_spans()
    assert span.name == "router TaskAccepted" and span.kind == SpanKind.CONSUMER
    assert span.parent is not None and f"{span.parent.span_id:016x}" == CLIENT.split("-")[2]
    assert span.context.trace_id == int(CLIENT.split("-")[1], 16)
    assert span.attributes is not None and span.attributes["fleetplane.task_id"] == "t1"
    mine = f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"
    assert header(routed) == mine
    # t2 was never seen by this process: no context is made up for it
    assert header(held_other) is None
    raw = outputs[2]
    assert isinstance(raw, RawRecord) and dict(raw.headers)["traceparent"] == mine.encode()
    assert dict(raw.headers)["a"] == b"b"


def test_an_output_of_another_task_carries_that_tasks_context(
        traced: tuple[Observability, InMemorySpanExporter]) -> None:
    _obs, exporter = traced
    other = "00-11111111111111111111111111111111-2222222222222222-01"
    queued = ev.TaskRouted(task_id="a", team="pay", spec=SPEC, attempt=1, model="m",
                           provider="anthropic", tier="small", reason="r")
    finished = ev.TaskCompleted(task_id="b", team="pay", attempt=1, model="m", output="o",
                                cost_usd=0.0, duration_ms=1)
    dispatch = ev.TaskDispatched(task_id="a", team="pay", spec=SPEC, attempt=1, model="m",
                                 provider="anthropic", tier="small")
    p = Processor("coordinator", ["x"], lambda e, r: [dispatch] if e.task_id == "b" else [],
                  Settings())
    p._handle_one(record(queued, other))       # a waits (nothing published)
    p._handle_one(record(finished, CLIENT))    # b ends; a is dispatched in b's handling
    span_a = next(s for s in exporter.get_finished_spans() if s.name.endswith("TaskRouted"))
    got = header(dispatch)
    assert got is not None and trace_id_of(got) == "1" * 32
    assert got.split("-")[2] == f"{span_a.context.span_id:016x}"


def test_records_without_context_get_no_span_except_where_traces_start(
        traced: tuple[Observability, InMemorySpanExporter]) -> None:
    _obs, exporter = traced
    accepted = ev.TaskAccepted(task_id="t3", team="pay", spec=SPEC)
    out = ev.TaskAccepted(task_id="t3", team="pay", spec=SPEC)
    Processor("router", ["x"], lambda e, r: [out], Settings())._handle_one(record(accepted))
    assert exporter.get_finished_spans() == ()
    assert header(out) is None
    tracing = traced[0].tracing
    assert tracing is not None
    set_instruments(lambda svc, group: tracing.instruments(svc, group, entry=True))
    out2 = ev.TaskAccepted(task_id="t3", team="pay", spec=SPEC)
    Processor("ingest", ["x"], lambda e, r: [out2], Settings())._handle_one(
        record(ev.TaskSubmitted(task_id="t3", team="pay", spec=SPEC)))
    (root,) = exporter.get_finished_spans()
    assert root.parent is None and root.name == "ingest TaskSubmitted"
    assert trace_id_of(header(out2)) == f"{root.context.trace_id:032x}"


def test_a_model_call_is_a_span_timed_by_its_latency_and_the_provider_gets_the_context(
        traced: tuple[Observability, InMemorySpanExporter]) -> None:
    _obs, exporter = traced
    at = datetime(2026, 12, 5, 12, 0, 5, tzinfo=UTC)
    call = ev.ModelCall(task_id="t4", team="pay", attempt=1, call_index=0, model="big",
                        provider="anthropic", tier="frontier", input_tokens=10,
                        output_tokens=2, cost_usd=0.01, latency_ms=1500, outcome="ok",
                        occurred_at=at)
    seen: dict[str, str] = {}

    def handler(event: ev.Event, rec: Record) -> list[Output]:
        seen.update(trace_headers())  # what executor.models sends to the provider
        return [call]

    dispatch = ev.TaskDispatched(task_id="t4", team="pay", spec=SPEC, attempt=1, model="big",
                                 provider="anthropic", tier="frontier")
    Processor("executor", ["x"], handler, Settings())._handle_one(record(dispatch, CLIENT))
    got = header(call)
    attempt, model = sorted(exporter.get_finished_spans(), key=lambda s: s.name)
    assert attempt.name == "executor TaskDispatched" and model.name == "model big"
    assert seen["traceparent"].split("-")[2] == f"{attempt.context.span_id:016x}"
    assert model.parent is not None and model.parent.span_id == attempt.context.span_id
    assert model.end_time == int(at.timestamp() * 1e9)
    assert model.start_time is not None and model.end_time - model.start_time == 1_500_000_000
    assert model.attributes is not None and model.attributes["gen_ai.usage.input_tokens"] == 10
    assert got is not None and got.split("-")[2] == f"{model.context.span_id:016x}"


def test_off_by_default_nothing_is_added() -> None:
    assert configure(Settings(), "router") is None
    assert trace_headers() == {}
    event = ev.TaskAccepted(task_id="t5", team="pay", spec=SPEC)
    assert "traceparent" not in dict(event_headers(event))


@pytest.mark.parametrize("value,ok", [
    (CLIENT, True), (CLIENT.upper(), True), ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", False),
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False), ("garbage", False),
    (None, False)])
def test_traceparent_values_are_checked(value: str | None, ok: bool) -> None:
    assert (trace_id_of(value) is not None) is ok
