"""Audit replay and tamper evidence on the real broker, and what accounting publishes back
(BudgetStatus, anomaly Alerts): events go through Kafka into the accounting processor and chdb."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, TopicPartition

from fleetplane.accounting import audit, queries
from fleetplane.accounting.publisher import Publisher
from fleetplane.accounting.store import Store
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import Processor
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import event_topics, load_topics
from tests.integration.fleet_history import Call, TaskStory
from tests.integration.test_accounting import close_test_store, open_test_store


@pytest.fixture(scope="module")
def ch_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = open_test_store(tmp_path_factory.mktemp("accounting-audit-ch"))
    yield store
    close_test_store(store)


@pytest.fixture(scope="module")
def accounting(base_settings: Settings, ch_store: Store) -> Iterator[Processor]:
    from fleetplane.accounting.main import build_processor

    settings = base_settings.model_copy(update={"clickhouse_database": ch_store.database})
    processor, _ = build_processor(settings, ch_store,
                                   group_id=f"accounting-audit-{time.monotonic_ns()}")
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    yield processor
    processor.stop()
    thread.join(30)


class LiveConsumer:
    """A stream consumer watching every event topic from its current end: what was seen live."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer({**settings.client_config(), "group.id": "audit-live",
                                  "enable.auto.commit": False})
        topics = event_topics(load_topics(settings.topics_file))
        meta = self.consumer.list_topics(timeout=10)
        assignment = []
        for t in topics:
            for p in meta.topics[t].partitions:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)
                assignment.append(TopicPartition(t, p, high))
        self.consumer.assign(assignment)
        self.seen: list[audit.Entry] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        serde = default_serde()
        while not self._stop.is_set():
            for m in self.consumer.consume(500, 0.2):
                if m.error() is None:
                    self.seen.append(audit.Entry(serde.decode(m.value() or b""), m.topic() or "",
                                                 m.partition() or 0, m.offset() or 0))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()

    def task(self, task_id: str) -> list[audit.Entry]:
        return audit.ordered(e for e in self.seen if e.event.task_id == task_id)


def wait_stored(store: Store, task_ids: set[str], events: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    n = 0
    while time.monotonic() < deadline:
        n = int(store.command(f"SELECT count() FROM {store.table('events')} FINAL WHERE task_id "
                              "IN {ids:Array(String)}", {"ids": sorted(task_ids)}))
        if n >= events:
            return
        time.sleep(0.3)
    raise AssertionError(f"{n}/{events} events stored after {timeout_s}s")


def ids(entries: list[audit.Entry]) -> list[str]:
    return [e.event.event_id for e in entries]


def story(task_id: str) -> TaskStory:
    return TaskStory(task_id, "audit-team", "codegen", "claude-sonnet-4-6",
                     calls=[Call(3000, 500, 0.05), Call(3500, 400, 0.05), Call(100, 10, 0.001)],
                     tools=2, workspace=True, held=("conflict", 0.5))


def test_replay_from_kafka_and_clickhouse_match_what_was_seen_live(
        base_settings: Settings, ch_store: Store, accounting: Processor, unique: str) -> None:
    live = LiveConsumer(base_settings)
    producer = EventProducer(base_settings)
    try:
        events = story(f"audit-{unique}").events()
        for e in events:                       # one at a time, as the services publish them
            producer.send([e])
        wait_stored(ch_store, {events[0].task_id}, len(events))
        time.sleep(0.5)
    finally:
        producer.close()
        live.close()
    task_id = events[0].task_id
    seen = live.task(task_id)
    from_kafka = audit.replay_kafka(base_settings, task_id)
    from_clickhouse = audit.entries_from_rows(queries.task_events(ch_store, task_id))
    assert ids(seen) == [e.event_id for e in events]
    assert ids(from_kafka) == ids(seen)
    assert ids(from_clickhouse) == ids(seen)
    assert audit.timeline(from_kafka) == audit.timeline(from_clickhouse) == audit.timeline(seen)
    types = [t["event_type"] for t in audit.timeline(from_kafka)]
    assert types[:5] == ["TaskSubmitted", "TaskAccepted", "TaskRouted", "TaskHeld",
                         "TaskDispatched"]
    assert types.count("ModelCall") == 3 and types.count("ToolCall") == 2
    assert types[-1] == "TaskCompleted"
    for entries in (from_kafka, from_clickhouse):
        verdict = audit.verify_task(entries)
        assert verdict["ok"], verdict
        assert verdict["attempts"][0]["events"] == 6


@pytest.mark.parametrize("tamper", ["changed", "removed", "reordered"])
def test_verify_detects_tampered_records_on_the_topics(
        base_settings: Settings, unique: str, tamper: str) -> None:
    events = story(f"audit-{tamper}-{unique}").events()
    calls = [i for i, e in enumerate(events) if isinstance(e, ev.ModelCall)]
    if tamper == "changed":     # a record rewritten after the fact: cheaper than it was
        call = events[calls[1]]
        assert isinstance(call, ev.ModelCall)
        events[calls[1]] = call.model_copy(update={"cost_usd": 0.0001})
    elif tamper == "removed":
        del events[calls[1]]
    else:                       # the second and third model calls swap places on the topic
        events[calls[1]], events[calls[2]] = events[calls[2]], events[calls[1]]
    producer = EventProducer(base_settings)
    try:
        for e in events:
            producer.send([e])
    finally:
        producer.close()
    verdict = audit.verify_task(audit.replay_kafka(base_settings, events[0].task_id))
    assert verdict["ok"] is False
    problems = " ".join(verdict["attempts"][0]["problems"])
    assert {"changed": "prev_hash does not match", "removed": "the outcome recorded 6",
            "reordered": "reordered"}[tamper] in problems


def read_new(settings: Settings, topic: str, team_prefix: str) -> list[ev.Event]:
    c = Consumer({**settings.client_config(), "group.id": f"r-{time.monotonic_ns()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    serde = default_serde()
    out: list[ev.Event] = []
    idle = time.monotonic()
    try:
        while time.monotonic() - idle < 3:
            for m in c.consume(500, 0.3):
                if m.error() is None:
                    idle = time.monotonic()
                    e = serde.decode(m.value() or b"")
                    if e.team.startswith(team_prefix) or e.task_id.startswith(team_prefix):
                        out.append(e)
    finally:
        c.close()
    return out


def test_budgets_and_anomaly_alerts_are_published_and_stored(
        base_settings: Settings, ch_store: Store, accounting: Processor, unique: str) -> None:
    team = f"anomaly-{unique}"
    stories = [TaskStory(f"{team}-{i}", team, "classify", "claude-haiku-4-5",
                         calls=[Call(1000 + 10 * (i % 4), 100, 0.010 + 0.0002 * (i % 4))])
               for i in range(24)]
    # the router also sent classify to a frontier model, at 20x the cost: not an anomaly
    stories += [TaskStory(f"{team}-big-{i}", team, "classify", "claude-sonnet-4-6",
                          calls=[Call(1000 + 10 * (i % 4), 100, 0.2 + 0.004 * (i % 4))])
                for i in range(22)]
    stories.append(TaskStory(f"{team}-outlier", team, "classify", "claude-haiku-4-5",
                             calls=[Call(1000, 100, 0.9)]))
    events = [e for s in stories for e in s.events()]
    producer = EventProducer(base_settings)
    try:
        producer.send(events)
        wait_stored(ch_store, {s.task_id for s in stories}, len(events))
        settings = base_settings.model_copy(update={"clickhouse_database": ch_store.database})
        publisher = Publisher(ch_store, settings, producer.send)
        first = publisher.check(force_budgets=True)
        assert first["alerts"] >= 1
        again = publisher.check()
        assert again == {"budgets": 0, "alerts": 0}   # nothing changed: nothing republished
    finally:
        producer.close()
    [status] = [e for e in read_new(base_settings, "fleet.budget", team)
                if isinstance(e, ev.BudgetStatus)]
    expected_spend = sum(c.cost_usd for s in stories for c in s.calls)
    assert status.spent_usd == pytest.approx(expected_spend)
    assert (status.budget_usd, status.state) == (50.0, "ok")
    alerts = [e for e in read_new(base_settings, "fleet.alerts", team)
              if isinstance(e, ev.Alert)]
    cost_alerts = [a for a in alerts if a.metric == "cost_usd"]
    assert [a.task_id for a in cost_alerts] == [f"{team}-outlier"]
    assert cost_alerts[0].value == pytest.approx(0.9)
    assert cost_alerts[0].baseline == pytest.approx(0.0103, abs=2e-4)
    # accounting consumes fleet.alerts too: the alert reaches the dashboard's table
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stored = [a for a in queries_alerts(ch_store) if a["task_id"] == f"{team}-outlier"]
        if stored:
            break
        time.sleep(0.3)
    assert stored and stored[0]["kind"] == "anomaly.cost_usd"


def queries_alerts(store: Store) -> list[dict[str, object]]:
    from fleetplane.accounting.analytics import recent_alerts

    return recent_alerts(store, limit=1000)
