"""Per-service metrics (fleetplane.metrics.loop, coordinator, executor, supervisor,
reconciler): what a loop, the coordinator's admission, the executor's slots and the
supervisor's restarts report."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from fleetplane.core import events as ev
from fleetplane.core.errors import NotRetriable
from fleetplane.core.loop import Output, Processor, Record
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.metrics.coordinator import Decisions, Queue
from fleetplane.metrics.executor import Calls, Slots
from fleetplane.metrics.reconciler import ReconcilerStats
from fleetplane.metrics.setup import Observability, instrument
from fleetplane.metrics.supervisor import Restarts

SPEC = ev.TaskSpec(name="n", task_type="summarize", prompt="p")
T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.fixture
def obs() -> Iterator[Observability]:
    o = instrument(Settings(), "router", registry=CollectorRegistry())
    try:
        yield o
    finally:
        o.close()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def rec(event: ev.Event | None, offset: int = 0) -> Record:
    raw = default_serde().encode(event) if event is not None else b"not avro"
    return Record("tasks.accepted", 0, offset, b"t", raw)


def test_a_loop_reports_records_handling_time_and_errors(obs: Observability) -> None:
    accepted = ev.TaskAccepted(task_id="t1", team="pay", spec=SPEC)

    def handler(event: ev.Event, record: Record) -> list[Output]:
        if record.offset == 1:
            raise NotRetriable("bad manifest")
        return []

    p = Processor("router", ["tasks.accepted"], handler, Settings())
    seen: list[ev.Event] = []
    obs.on_input(seen.append)  # a hook added after the loop was built sees its inputs
    records = [rec(accepted, 0), rec(accepted, 1), rec(None, 2)]
    p.instruments.consumed(records)
    for r in records:
        p._handle_one(r)
    p.instruments.committed(0.02)
    p.instruments.aborted()
    r = obs.registry
    assert value(r, "fleetplane_loop_records_total", service="router",
                 group="fleetplane-router", topic="tasks.accepted") == 3
    assert value(r, "fleetplane_loop_batches_total", service="router",
                 group="fleetplane-router") == 1
    assert value(r, "fleetplane_loop_handle_seconds_count", service="router",
                 event_type="TaskAccepted") == 2  # the undecodable record is not handled
    assert value(r, "fleetplane_loop_errors_total", service="router",
                 error_class="NotRetriable", action="dead_letter") == 1
    assert value(r, "fleetplane_loop_errors_total", service="router",
                 error_class="DecodeError", action="dead_letter") == 1
    assert value(r, "fleetplane_loop_commit_seconds_count", service="router",
                 group="fleetplane-router") == 1
    assert value(r, "fleetplane_loop_aborts_total", service="router",
                 group="fleetplane-router") == 1
    assert [e.task_id for e in seen] == ["t1", "t1"]


def test_without_instrument_a_loop_reports_nothing() -> None:
    o = instrument(Settings(), "router", registry=CollectorRegistry())
    o.close()
    p = Processor("router", ["x"], lambda e, r: [], Settings())
    p._handle_one(rec(ev.TaskAccepted(task_id="t1", team="pay", spec=SPEC)))
    assert value(o.registry, "fleetplane_loop_handle_seconds_count", service="router",
                 event_type="TaskAccepted") == 0


def test_coordinator_admission_latency_decisions_and_queue() -> None:
    registry = CollectorRegistry()
    d = Decisions(registry)
    routed = ev.TaskRouted(task_id="a", team="pay", spec=SPEC, attempt=1, model="m",
                           provider="anthropic", tier="small", reason="r", occurred_at=T0)
    d.routed(routed)
    d.routed(routed)  # the repartition step and the schedule step both see it
    d.published(ev.TaskHeld(task_id="a", team="pay", reason="quota", kind="quota"))
    d.published(ev.TaskDispatched(task_id="a", team="pay", spec=SPEC, attempt=1, model="m",
                                  provider="anthropic", tier="small",
                                  occurred_at=T0 + timedelta(seconds=3)))
    assert value(registry, "fleetplane_coordinator_admission_seconds_count") == 1
    assert value(registry, "fleetplane_coordinator_admission_seconds_sum") == 3.0
    # an executor starts it 2 s after the dispatch: the dispatch latency (once per attempt)
    for _ in range(2):
        d.routed(ev.TaskStarted(task_id="a", team="pay", attempt=1, executor_id="ex",
                                occurred_at=T0 + timedelta(seconds=5)))
    assert value(registry, "fleetplane_coordinator_dispatch_seconds_count") == 1
    assert value(registry, "fleetplane_coordinator_dispatch_seconds_sum") == 2.0
    assert value(registry, "fleetplane_coordinator_decisions_total", decision="hold",
                 kind="quota") == 1
    assert value(registry, "fleetplane_coordinator_decisions_total", decision="dispatch",
                 kind="") == 1
    registry.register(Queue(
        lambda: {"ready": True, "running": {"pay": 2}, "max_running": 64,
                 "task_rows": 10, "finished_rows": 7},
        lambda: [{"team": "pay", "kind": "quota"}, {"team": "pay", "kind": "conflict"},
                 {"team": "ops", "kind": "quota"}]))
    assert value(registry, "fleetplane_coordinator_queued", team="pay") == 2
    assert value(registry, "fleetplane_coordinator_held", kind="quota") == 2
    assert value(registry, "fleetplane_coordinator_running", team="pay") == 2
    assert value(registry, "fleetplane_coordinator_capacity") == 64
    assert value(registry, "fleetplane_coordinator_active") == 1
    assert value(registry, "fleetplane_coordinator_table_rows", state="finished") == 7
    assert value(registry, "fleetplane_coordinator_table_rows", state="unfinished") == 3
    standby = CollectorRegistry()
    standby.register(Queue(lambda: {"ready": False}, lambda: []))
    assert value(standby, "fleetplane_coordinator_active") == 0


def test_executor_slots_and_call_latency() -> None:
    registry = CollectorRegistry()
    busy = [3]
    registry.register(Slots(8, lambda: busy[0], lambda: 2))
    calls = Calls(registry)
    calls.observe(ev.ModelCall(task_id="t", team="pay", attempt=1, call_index=0, model="big",
                               provider="anthropic", tier="frontier", input_tokens=1,
                               output_tokens=1, cost_usd=0.0, latency_ms=250, outcome="ok"))
    calls.observe(ev.ToolCall(task_id="t", team="pay", attempt=1, call_index=1, tool="read",
                              arguments="{}", outcome="ok", duration_ms=5))
    assert value(registry, "fleetplane_executor_slots", state="busy") == 3
    assert value(registry, "fleetplane_executor_slots", state="free") == 5
    assert value(registry, "fleetplane_executor_attempts_running") == 2
    assert value(registry, "fleetplane_executor_model_call_seconds_sum", model="big",
                 outcome="ok") == 0.25
    assert value(registry, "fleetplane_executor_tool_call_seconds_count", tool="read",
                 outcome="ok") == 1
    busy[0] = 8
    assert value(registry, "fleetplane_executor_slots", state="free") == 0


def test_supervisor_restarts_and_reconciler_redrives() -> None:
    registry = CollectorRegistry()
    state = {"services": {"router": {"restarts": 2}, "executor": {"restarts": 0}},
             "broker": {"restarts": 1}}
    registry.register(Restarts(lambda: state, lambda name: name != "executor"))
    assert value(registry, "fleetplane_service_restarts_total", service="router") == 2
    assert value(registry, "fleetplane_service_restarts_total", service="broker") == 1
    assert value(registry, "fleetplane_service_up", service="executor") == 0
    assert value(registry, "fleetplane_service_up", service="router") == 1
    registry.register(ReconcilerStats(lambda: {
        "counters": {"redrives.accepted": 3, "gave_up.routed": 1, "scans": 9},
        "waiting_at": {"routed": 4}, "last_scan_s_ago": 1.5}))
    assert value(registry, "fleetplane_reconciler_redrives_total", hop="accepted") == 3
    assert value(registry, "fleetplane_reconciler_gave_up_total", hop="routed") == 1
    assert value(registry, "fleetplane_reconciler_tasks", waiting_at="routed") == 4
    assert value(registry, "fleetplane_reconciler_last_scan_age_seconds") == 1.5
