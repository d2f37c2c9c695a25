"""Accounting on the real broker and a real ClickHouse engine (chdb in a temporary directory, or
the server at FLEETPLANE_TEST_CLICKHOUSE_URL): events in, deduplicated rows and task states out.

chdb hosts one data directory per process at a time, so this module opens one store for all its
tests (module scope, closed at the end so other modules may open theirs) and every test uses its
own teams and task ids.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from fleetplane.accounting import analytics, queries
from fleetplane.accounting.batchloop import BatchProcessor
from fleetplane.accounting.main import build_processor
from fleetplane.accounting.rows import MODEL_CALLS, model_call_row
from fleetplane.accounting.schema import apply_ddl
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.accounting.store import Store, connect, is_chdb
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import Processor
from fleetplane.core.settings import Settings
from fleetplane.core.topics import LIFECYCLE


def open_test_store(chdb_dir: Path) -> Store:
    """ClickHouse for a test module: the server at FLEETPLANE_TEST_CLICKHOUSE_URL (own database)
    or chdb in `chdb_dir`; the schema is applied."""
    url = os.environ.get("FLEETPLANE_TEST_CLICKHOUSE_URL")
    dsn = url or f"chdb://{chdb_dir.resolve().as_posix()}"
    database = f"fleetplane_test_{uuid.uuid4().hex[:8]}"
    store = connect(Settings(clickhouse_dsn=dsn, clickhouse_database=database))
    apply_ddl(store)
    return store


def close_test_store(store: Store) -> None:
    if not is_chdb(store.dsn):
        store.command(f"DROP DATABASE IF EXISTS {store.database}")
    store.close()


@pytest.fixture(scope="module")
def ch_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = open_test_store(tmp_path_factory.mktemp("accounting-ch"))
    yield store
    close_test_store(store)


@pytest.fixture(scope="module")
def accounting(base_settings: Settings, ch_store: Store) -> Iterator[Processor]:
    """One accounting processor (own group, every topic from the start) for the module."""
    settings = base_settings.model_copy(update={"clickhouse_database": ch_store.database})
    processor, _ = build_processor(settings, ch_store,
                                   group_id=f"accounting-test-{time.monotonic_ns()}")
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    yield processor
    processor.stop()
    thread.join(30)


def spec(task_type: str = "refactor") -> ev.TaskSpec:
    return ev.TaskSpec(name="n", task_type=task_type, prompt="p")


def model_call(task_id: str, team: str, index: int, cost: float, model: str = "claude-sonnet-4-5",
               tier: str = "standard") -> ev.ModelCall:
    return ev.ModelCall(task_id=task_id, team=team, attempt=1, call_index=index, model=model,
                        provider="anthropic", tier=tier, input_tokens=100 + index,
                        output_tokens=10 + index, cache_read_input_tokens=5, cost_usd=cost,
                        latency_ms=12.5, outcome="ok", stop_reason="end_turn")


def wait_for(check: Callable[[], Any], timeout_s: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or check}: last={last!r}")


def has_events(store: Store, task_id: str, n: int) -> Callable[[], bool]:
    return lambda: len(queries.task_events(store, task_id)) >= n


def test_cost_by_team_equals_published_cost_and_duplicates_count_once(
    accounting: Processor, ch_store: Store, producer: EventProducer, unique: str
) -> None:
    team = f"team-{unique}"
    task_id = f"task-{unique}"
    costs = [0.0125, 0.5, 1.25, 0.003, 2.0]
    calls = [model_call(task_id, team, i, c) for i, c in enumerate(costs)]
    other = model_call(f"{task_id}-b", team, 0, 0.75, model="gpt-4o-mini", tier="small")
    producer.send([ev.TaskAccepted(task_id=task_id, team=team, spec=spec("review")), *calls,
                   other])
    producer.send([calls[2]])  # the same event (same event_id) delivered a second time
    # Same topic and key (so same partition) as the duplicate: once the marker is stored, the
    # duplicate before it has been consumed too.
    marker = model_call(task_id, team, 99, 0.0)
    producer.send([marker])

    wait_for(has_events(ch_store, task_id, len(calls) + 2), what="model calls in ClickHouse")
    wait_for(has_events(ch_store, other.task_id, 1), what="the other task's call")
    [row] = queries.cost_by(ch_store, "team", team=team)
    assert row["team"] == team
    assert row["cost_usd"] == pytest.approx(sum(costs) + 0.75)
    assert row["calls"] == len(calls) + 2  # each call once: the duplicate is not counted
    assert row["tasks"] == 2
    assert row["input_tokens"] == sum(c.input_tokens for c in [*calls, other, marker])
    assert row["cache_read_input_tokens"] == 5 * (len(calls) + 2)

    by_model = {r["model"]: r for r in queries.cost_by(ch_store, "model", team=team)}
    assert by_model["claude-sonnet-4-5"]["cost_usd"] == pytest.approx(sum(costs))
    assert by_model["gpt-4o-mini"]["cost_usd"] == pytest.approx(0.75)
    by_tier = {r["tier"]: r["calls"] for r in queries.cost_by(ch_store, "tier", team=team)}
    assert by_tier == {"standard": len(calls) + 1, "small": 1}
    by_type = {r["task_type"]: r["cost_usd"]
               for r in queries.cost_by(ch_store, "task_type", team=team)}
    assert by_type["review"] == pytest.approx(sum(costs))
    assert by_type[""] == pytest.approx(0.75)  # task type not known for task-b

    timeline = queries.task_events(ch_store, task_id)
    ids = [e["event_id"] for e in timeline]
    assert len(ids) == len(set(ids)) == len(calls) + 2

    daily = analytics.cost_daily(ch_store, "team", team=team)  # the materialized rollup
    assert sum(r["cost_usd"] for r in daily) == pytest.approx(sum(costs) + 0.75)
    assert sum(r["calls"] for r in daily) == len(calls) + 2


def test_a_model_call_inserted_again_is_not_summed_twice_by_the_daily_rollups(
        ch_store: Store, unique: str) -> None:
    """A batch redelivered after a crash between insert and offset commit (found by the chaos
    run's daily-cost check): the ReplacingMergeTree hides the duplicate row, the materialized
    views behind /v1/cost/daily would not."""
    team = f"redeliver-{unique}"
    first = model_call(f"t1-{unique}", team, 0, 0.25)
    second = model_call(f"t2-{unique}", team, 0, 1.5)
    sink = ClickHouseSink(ch_store)
    sink.add({MODEL_CALLS: [model_call_row(first)]})
    sink.flush()
    sink.add({MODEL_CALLS: [model_call_row(first), model_call_row(second),
                            model_call_row(second)]})
    assert sink.pending == 3
    sink.flush()
    assert sink.pending == 0
    daily = analytics.cost_daily(ch_store, "team", team=team)
    assert sum(r["cost_usd"] for r in daily) == pytest.approx(1.75)
    assert sum(r["calls"] for r in daily) == 2
    [row] = queries.cost_by(ch_store, "team", team=team)
    assert (row["cost_usd"], row["calls"]) == (pytest.approx(1.75), 2)


def test_lifecycle_events_give_each_task_its_latest_state(
    accounting: Processor, ch_store: Store, producer: EventProducer, unique: str
) -> None:
    team = f"team-{unique}"
    done, failed, retrying = f"{unique}-done", f"{unique}-failed", f"{unique}-retry"
    s = spec("migrate")
    flow: list[ev.Event] = [
        ev.TaskSubmitted(task_id=done, team=team, spec=s),
        ev.TaskAccepted(task_id=done, team=team, spec=s),
        ev.TaskRouted(task_id=done, attempt=1, model="claude-haiku-4-5", provider="anthropic",
                      tier="small", reason="cheap", team=team, spec=s),
        ev.TaskDispatched(task_id=done, attempt=1, model="claude-haiku-4-5",
                          provider="anthropic", tier="small", team=team, spec=s),
        ev.TaskStarted(task_id=done, team=team, attempt=1, executor_id="e1"),
        ev.TaskHeartbeat(task_id=done, team=team, attempt=1, executor_id="e1"),
        model_call(done, team, 0, 0.02, model="claude-haiku-4-5", tier="small"),
        model_call(done, team, 1, 0.03, model="claude-haiku-4-5", tier="small"),
        ev.TaskCompleted(task_id=done, team=team, attempt=1, model="claude-haiku-4-5",
                         output="ok", cost_usd=0.05, duration_ms=900),
        ev.TaskSubmitted(task_id=failed, team=team, spec=s),
        ev.TaskStarted(task_id=failed, team=team, attempt=1, executor_id="e1"),
        ev.TaskFailed(task_id=failed, team=team, attempt=1, failure_class="tool",
                      reason="tests failed", final=True),
        ev.TaskSubmitted(task_id=retrying, team=team, spec=s),
        ev.TaskFailed(task_id=retrying, team=team, attempt=1, failure_class="provider",
                      reason="429", final=False),
        ev.TaskRetrying(task_id=retrying, team=team, attempt=1, delay_ms=500, reason="429"),
    ]
    producer.send(flow)
    # A redelivered start after the terminal state must not reopen the task.
    late = ev.TaskStarted(task_id=done, team=team, attempt=1, executor_id="e1")
    producer.send([late])

    wait_for(has_events(ch_store, done, 10), what="lifecycle in ClickHouse")
    wait_for(has_events(ch_store, retrying, 3), what="retrying task in ClickHouse")
    wait_for(has_events(ch_store, failed, 3), what="failed task in ClickHouse")

    tasks = {t["task_id"]: t for t in queries.task_list(ch_store, team=team)}
    assert {k: v["state"] for k, v in tasks.items()} == {
        done: "completed", failed: "failed", retrying: "retrying"}
    assert tasks[done]["task_type"] == "migrate"
    assert tasks[done]["model"] == "claude-haiku-4-5"
    assert tasks[done]["tier"] == "small"
    assert tasks[done]["cost_usd"] == pytest.approx(0.05)
    assert tasks[done]["model_calls"] == 2
    assert tasks[failed]["reason"] == "tests failed"
    assert tasks[failed]["cost_usd"] == 0

    completed = queries.task_list(ch_store, team=team, state="completed")
    assert [t["task_id"] for t in completed] == [done]
    assert queries.state_counts(ch_store, team=team) == {
        "completed": 1, "failed": 1, "retrying": 1}

    timeline = queries.task_events(ch_store, done)
    assert [e["event_type"] for e in timeline][:5] == [
        "TaskSubmitted", "TaskAccepted", "TaskRouted", "TaskDispatched", "TaskStarted"]
    assert [e["event_id"] for e in timeline if e["event_type"] == "TaskCompleted"] == [
        flow[8].event_id]
    stamps = [e["occurred_at"] for e in timeline]
    assert stamps == sorted(stamps)
    completed_payload = next(e["payload"] for e in timeline if e["event_type"] == "TaskCompleted")
    assert completed_payload["cost_usd"] == 0.05
    assert all(e["topic"] for e in timeline)


def test_bad_records_and_dead_letters_do_not_stop_the_flow(
    accounting: Processor, ch_store: Store, producer: EventProducer, base_settings: Settings,
    unique: str,
) -> None:
    team = f"team-{unique}"
    task_id = f"task-{unique}"
    raw = Producer(base_settings.producer_config())
    raw.produce(LIFECYCLE, key=task_id.encode(), value=b"\x00garbage")
    raw.flush(10)
    dead = ev.DeadLetter(task_id=task_id, team=team, service="ingest",
                         source_topic="tasks.submitted", source_partition=0, source_offset=7,
                         key=task_id.encode(), payload=b"\xff\xfe not utf-8",
                         headers={"origin": b"\x01"}, error_class="DecodeError", reason="bad")
    after = ev.TaskHeld(task_id=task_id, team=team, reason="write scope busy", held_by="other")
    producer.send([dead, after])

    # The garbage itself comes back as accounting's own dead letter (keyed like the record).
    wait_for(has_events(ch_store, task_id, 3), what="events after garbage")
    timeline = queries.task_events(ch_store, task_id)
    letters = {e["payload"]["service"]: e["payload"] for e in timeline
               if e["event_type"] == "DeadLetter"}
    assert letters["ingest"]["bytes_encoding"] == "base64"
    assert letters["ingest"]["payload"] == "//4gbm90IHV0Zi04"
    assert letters["ingest"]["headers"] == {"origin": "AQ=="}
    assert letters["accounting"]["payload"] == "AGdhcmJhZ2U="  # b"\x00garbage"
    assert letters["accounting"]["source_topic"] == LIFECYCLE
    [held_event] = [e for e in timeline if e["event_type"] == "TaskHeld"]
    assert held_event["payload"]["reason"] == "write scope busy"
    [held] = queries.task_list(ch_store, team=team)
    assert (held["state"], held["reason"]) == ("held", "write scope busy")


def hourly_processor(base_settings: Settings, ch_store: Store, name: str
                     ) -> tuple[Store, BatchProcessor, ClickHouseSink]:
    """An accounting processor (not started) that checkpoints once an hour and never flushes by
    size, into its own database `name` (the module's processor does not write there) and group."""
    store = ch_store.with_database(name)
    apply_ddl(store)
    settings = base_settings.model_copy(update={"clickhouse_database": store.database,
                                                "sink_flush_rows": 10_000_000})
    processor, sink = build_processor(settings, store, group_id=name, commit_interval_s=3600)
    return store, processor, sink


def test_the_last_rows_of_a_backlog_are_stored_without_waiting_for_the_commit_interval(
    base_settings: Settings, ch_store: Store, producer: EventProducer, unique: str
) -> None:
    """A backlog read in full batches: once the input runs dry, the rest is flushed and its
    offsets stored at once, not at the next commit interval (an hour here)."""
    team = f"team-{unique}"
    calls = [model_call(f"task-{unique}-{i // 5}", team, i % 5, 0.01) for i in range(400)]
    producer.send(calls)   # the backlog, before accounting starts
    store, processor, sink = hourly_processor(base_settings, ch_store, f"backlog_{unique}")
    # full batches of 50 records (the service's are 20,000) without producing 20,000 records
    processor.settings = processor.settings.model_copy(update={"batch_size": 50})
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    try:
        def stored() -> list[dict[str, Any]]:
            rows = queries.cost_by(store, "team", team=team)
            return rows if sink.pending == 0 and rows and rows[0]["calls"] == len(calls) else []

        [row] = wait_for(stored, what="every call stored, nothing left buffered")
        assert row["cost_usd"] == pytest.approx(0.01 * len(calls))
    finally:
        processor.stop()
        thread.join(30)


def test_a_trickle_is_read_a_few_times_a_second_not_per_record(
    base_settings: Settings, ch_store: Store, producer: EventProducer, unique: str
) -> None:
    """A steady trickle (a record every 4 ms or so): the sink looks at its inputs about once
    per sink_probe_s (1 s here), each look a probe of every partition it reads, instead of
    probing again right after each small batch, and it still handles every record."""
    team = f"team-{unique}"
    _store, processor, sink = hourly_processor(
        base_settings.model_copy(update={"sink_probe_s": 1.0}), ch_store, f"trickle_{unique}")
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: processor._idle is not None and processor._idle.idle,
                 what="the sink parked on its idle inputs")
        assert processor._idle is not None
        probes, started = processor._idle.probes, time.monotonic()
        calls = [model_call(f"task-{unique}", team, i, 0.01) for i in range(500)]
        for call in calls:
            producer.send([call])
            time.sleep(0.004)
        # each call: a model_calls row and an events row, buffered in the sink
        wait_for(lambda: sink.pending >= 2 * len(calls), what="every call handled")
        looks, seconds = processor._idle.probes - probes, time.monotonic() - started
        assert looks <= seconds + 3, f"{looks} probes in {seconds:.1f} s of trickle"
    finally:
        processor.stop()
        thread.join(30)


def test_stop_flushes_rows_buffered_since_the_last_checkpoint(
    base_settings: Settings, ch_store: Store, producer: EventProducer, unique: str
) -> None:
    """SIGTERM path: stop() checkpoints, which flushes the sink before storing offsets."""
    team = f"team-{unique}"
    calls = [model_call(f"task-{unique}", team, i, 0.1) for i in range(20)]
    store, processor, sink = hourly_processor(base_settings, ch_store, f"stop_{unique}")
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    try:
        producer.send(calls)
        # each call: a model_calls row and an events row, buffered in the sink
        wait_for(lambda: sink.pending >= 2 * len(calls), what="calls handled")
        assert queries.cost_by(store, "team", team=team) == []  # buffered, not written
    finally:
        processor.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert sink.pending == 0
    [row] = queries.cost_by(store, "team", team=team)
    assert row["calls"] == len(calls)
    assert row["cost_usd"] == pytest.approx(0.1 * len(calls))
