"""Fleet metrics from events (fleetplane.metrics.fleet): what a platform team's alerts read."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest

from fleetplane.core import events as ev
from fleetplane.metrics.fleet import FleetMetrics

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def value(m: FleetMetrics, name: str, **labels: str) -> float:
    got = m.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_a_task_moves_the_counters_once_however_often_its_events_arrive() -> None:
    m = FleetMetrics(quota=lambda team: {"pay": 5}.get(team, 20))
    submitted = ev.TaskSubmitted(task_id="t1", team="pay", occurred_at=at(0), spec=ev.TaskSpec(
        name="n", task_type="codegen", prompt="p"))
    started = ev.TaskStarted(task_id="t1", team="pay", attempt=1, executor_id="x",
                             occurred_at=at(1))
    call = ev.ModelCall(task_id="t1", team="pay", attempt=1, call_index=0, model="big",
                        provider="anthropic", tier="frontier", input_tokens=100, output_tokens=20,
                        cache_read_input_tokens=50, cost_usd=0.5, latency_ms=1500,
                        outcome="ok", occurred_at=at(2))
    done = ev.TaskCompleted(task_id="t1", team="pay", attempt=1, model="big", output="o",
                            cost_usd=0.5, duration_ms=3000, occurred_at=at(4))
    for e in (submitted, started, call):
        m.observe(e)
    assert value(m, "fleetplane_tasks_running", team="pay") == 1
    assert value(m, "fleetplane_team_running_quota", team="pay") == 5
    for e in (call, done, done):  # redeliveries
        m.observe(e)
    assert value(m, "fleetplane_tasks_finished_total", outcome="completed", team="pay") == 1
    assert value(m, "fleetplane_tasks_running", team="pay") == 0
    assert value(m, "fleetplane_task_duration_seconds_sum", outcome="completed", team="pay") == 4
    assert value(m, "fleetplane_model_calls_total", model="big", team="pay", outcome="ok") == 1
    assert value(m, "fleetplane_model_tokens_total", model="big", team="pay", kind="input") == 100
    assert value(m, "fleetplane_model_tokens_total", model="big", team="pay",
                 kind="cache_read") == 50
    assert value(m, "fleetplane_model_cost_usd_total", model="big", team="pay") == 0.5
    assert value(m, "fleetplane_model_call_seconds_count", model="big") == 1
    # buckets as prometheus_client's histograms write them: cumulative, `le` like "2.0"
    assert value(m, "fleetplane_model_call_seconds_bucket", model="big", le="1.0") == 0
    assert value(m, "fleetplane_model_call_seconds_bucket", model="big", le="2.0") == 1
    assert value(m, "fleetplane_model_call_seconds_bucket", model="big", le="+Inf") == 1
    assert value(m, "fleetplane_events_total", type="ModelCall", team="pay") == 1


def test_cache_hits_and_dead_letters_by_service_and_class() -> None:
    m = FleetMetrics()
    m.observe(ev.TaskCompleted(task_id="t2", team="a", attempt=1, model="cache", output="o",
                               cost_usd=0.0, duration_ms=1, cached=True))
    m.observe(ev.DeadLetter(task_id="", team="", service="router", source_topic="tasks.accepted",
                            source_partition=0, source_offset=7, payload=b"x",
                            error_class="DecodeError", reason="not avro"))
    assert value(m, "fleetplane_cache_hits_total", team="a") == 1
    assert value(m, "fleetplane_dead_letters_total", service="router",
                 error_class="DecodeError") == 1
    # a task whose submission was not seen (accounting started later) still counts as finished
    assert value(m, "fleetplane_tasks_finished_total", outcome="completed", team="a") == 1
    assert value(m, "fleetplane_task_duration_seconds_count", outcome="completed", team="a") == 0


def test_an_outcome_read_before_its_submission_still_gives_the_duration() -> None:
    """Submissions and outcomes are on different topics with no order between them: the
    accounting service may read a task's end first (seen in the metrics e2e run)."""
    m = FleetMetrics()
    done = ev.TaskCompleted(task_id="t2", team="pay", attempt=1, model="m", output="o",
                            cost_usd=0.1, duration_ms=1000, occurred_at=at(7))
    m.observe(done)
    assert value(m, "fleetplane_task_duration_seconds_count", outcome="completed",
                 team="pay") == 0
    m.observe(ev.TaskSubmitted(task_id="t2", team="pay", occurred_at=at(2), spec=ev.TaskSpec(
        name="n", task_type="codegen", prompt="p")))
    assert value(m, "fleetplane_task_duration_seconds_count", outcome="completed",
                 team="pay") == 1
    assert value(m, "fleetplane_task_duration_seconds_sum", outcome="completed", team="pay") == 5


def test_a_start_read_after_its_outcome_does_not_leave_the_task_running() -> None:
    """TaskStarted (tasks.lifecycle) and TaskCompleted (tasks.outcomes) have no order between
    them: read the other way round, the task is not running (seen in the metrics e2e run)."""
    m = FleetMetrics()
    m.observe(ev.TaskCompleted(task_id="t3", team="pay", attempt=1, model="m", output="o",
                               cost_usd=0.1, duration_ms=10, occurred_at=at(3)))
    m.observe(ev.TaskStarted(task_id="t3", team="pay", attempt=1, executor_id="x",
                             occurred_at=at(1)))
    assert value(m, "fleetplane_tasks_running", team="pay") == 0
    assert value(m, "fleetplane_tasks_finished_total", outcome="completed", team="pay") == 1


def test_a_retried_task_is_finished_once_with_its_final_outcome() -> None:
    """A failed attempt that is retried (TaskFailed final=false) ends the attempt, not the
    task: the task counts once, as completed, with its duration from submit to the end."""
    m = FleetMetrics()
    m.observe(ev.TaskSubmitted(task_id="t4", team="pay", occurred_at=at(0), spec=ev.TaskSpec(
        name="n", task_type="codegen", prompt="p")))
    m.observe(ev.TaskStarted(task_id="t4", team="pay", attempt=1, executor_id="x",
                             occurred_at=at(1)))
    m.observe(ev.TaskFailed(task_id="t4", team="pay", attempt=1, failure_class="model_error",
                            reason="overloaded", final=False, occurred_at=at(2)))
    assert value(m, "fleetplane_tasks_running", team="pay") == 0
    m.observe(ev.TaskStarted(task_id="t4", team="pay", attempt=2, executor_id="x",
                             occurred_at=at(3)))
    assert value(m, "fleetplane_tasks_running", team="pay") == 1
    m.observe(ev.TaskCompleted(task_id="t4", team="pay", attempt=2, model="m", output="o",
                               cost_usd=0.1, duration_ms=10, occurred_at=at(6)))
    assert value(m, "fleetplane_tasks_running", team="pay") == 0
    assert value(m, "fleetplane_tasks_finished_total", outcome="failed", team="pay") == 0
    assert value(m, "fleetplane_tasks_finished_total", outcome="completed", team="pay") == 1
    assert value(m, "fleetplane_task_duration_seconds_sum", outcome="completed", team="pay") == 6


def _samples(m: FleetMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in m.registry.collect() for s in metric.samples
            if not s.name.endswith("_created")}


def test_a_batch_of_decoded_fields_counts_what_one_event_at_a_time_counts() -> None:
    """The sink hands the metrics each batch as (type, fields) decoded from the records, with
    no event object (observe_batch); the totals equal observing each event, redeliveries
    included."""
    from fleetplane.accounting.bench import synthetic_events
    from fleetplane.core.serde import default_serde

    serde = default_serde()
    events = list(synthetic_events(40, prefix="fm"))
    events += events[:30]  # redelivered
    one_by_one = FleetMetrics(quota=lambda team: 7)
    for e in events:
        one_by_one.observe(e)
    batched = FleetMetrics(quota=lambda team: 7)
    decoded = [serde.decode_record(serde.encode(e)) for e in events]
    batched.observe_batch(decoded[:300])
    batched.observe_batch(decoded[300:])
    want, got = _samples(one_by_one), _samples(batched)
    assert any(k[0] == "fleetplane_model_calls_total" and v > 0 for k, v in want.items())
    assert any(k[0] == "fleetplane_task_duration_seconds_count" and v > 0
               for k, v in want.items())
    assert got.keys() == want.keys()
    for key, expected in want.items():
        assert got[key] == pytest.approx(expected, rel=1e-9), key


def test_a_record_the_metrics_cannot_read_is_skipped_and_the_batch_counted() -> None:
    m = FleetMetrics()
    good = ev.ModelCall(task_id="t9", team="a", attempt=1, call_index=0, model="m",
                        provider="anthropic", tier="small", input_tokens=3, output_tokens=1,
                        cost_usd=0.25, latency_ms=10, outcome="ok", occurred_at=at(0))
    m.observe_batch([("ModelCall", {"event_id": "broken", "team": "a"}),  # no model, no tokens
                     ("ModelCall", good.__dict__)])
    assert value(m, "fleetplane_model_calls_total", model="m", team="a", outcome="ok") == 1
    assert value(m, "fleetplane_model_cost_usd_total", model="m", team="a") == 0.25


def test_scrapes_while_the_sink_observes_see_consistent_totals() -> None:
    """/metrics is served from another thread than the sink's: scrapes taken while batches
    are observed never fail, and the last one has every event."""
    from fleetplane.accounting.bench import synthetic_events
    from fleetplane.core.serde import default_serde

    serde = default_serde()
    decoded = [serde.decode_record(serde.encode(e))
               for e in synthetic_events(300, prefix="scrape")]
    m = FleetMetrics(quota=lambda team: 3)
    errors: list[BaseException] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            try:
                generate_latest(m.registry)
            except BaseException as exc:
                errors.append(exc)
                return

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(0, len(decoded), 50):
            m.observe_batch(decoded[i:i + 50])
    finally:
        done.set()
        scraper.join(30)
    assert not errors, errors
    calls = sum(1 for name, _ in decoded if name == "ModelCall")
    text = generate_latest(m.registry).decode()
    got = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("fleetplane_model_calls_total{"))
    assert calls > 0 and got == calls
