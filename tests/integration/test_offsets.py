"""A committed offset beyond the log end (records lost by a broker crash): reported and reset to
the log end, on the real broker (fleetplane.core.offsets, called from core.loop on assignment)."""

from __future__ import annotations

import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from fleetplane.core import events as ev
from fleetplane.core.loop import Processor, Record
from fleetplane.core.offsets import reset_beyond_end
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import TopicSpec, ensure_topics


def topic_with(settings: Settings, name: str, records: int) -> None:
    ensure_topics(settings.client_config(), [TopicSpec(name, "task_id", 1, 1, -1, "delete")])
    p = Producer(settings.client_config())
    serde = default_serde()
    for i in range(records):
        e = ev.TaskHeartbeat(task_id=f"old-{i}", team="a", attempt=1, executor_id="x")
        p.produce(name, key=e.task_id.encode(), value=serde.encode(e))
    assert p.flush(30) == 0


def commit_beyond_end(settings: Settings, group: str, topic: str, offset: int) -> None:
    """As after a broker crash: the group's committed offset is past what the log kept."""
    c = Consumer({**settings.client_config(), "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)
    finally:
        c.close()


def test_reset_beyond_end_reports_the_lost_range_and_starts_at_the_log_end(
        base_settings: Settings, unique: str) -> None:
    topic, group = f"trunc-{unique}", f"trunc-g-{unique}"
    topic_with(base_settings, topic, 10)
    commit_beyond_end(base_settings, group, topic, 50)
    c = Consumer({**base_settings.client_config(), "group.id": group,
                  "enable.auto.commit": False})
    try:
        (t,) = reset_beyond_end(c, [TopicPartition(topic, 0)])
        assert (t.topic, t.committed, t.log_end, t.lost) == (topic, 50, 10, 40)
        assert [tp.topic for tp in c.assignment()] == [topic]
        # a partition within its log is left as it is
        commit_beyond_end(base_settings, group, topic, 4)
        assert reset_beyond_end(c, [TopicPartition(topic, 0)]) == []
    finally:
        c.close()


def test_processor_after_truncation_reads_new_records_only(base_settings: Settings,
                                                            unique: str) -> None:
    """Without the check, librdkafka resets the out-of-range position to the earliest offset
    and the ten old records are processed a second time."""
    topic, group = f"trunc-{unique}", f"trunc-p-{unique}"
    topic_with(base_settings, topic, 10)
    commit_beyond_end(base_settings, group, topic, 50)
    seen: list[str] = []

    def handler(event: ev.Event, rec: Record) -> list[ev.Event]:
        seen.append(event.task_id)
        return []

    settings = base_settings.model_copy(update={"instance_id": unique})
    assigned = threading.Event()
    p = Processor("trunc", [topic], handler, settings, group_id=group,
                  on_assign=lambda _c, _parts: assigned.set())
    thread = threading.Thread(target=p.run, daemon=True)
    thread.start()
    try:
        assert assigned.wait(60), "never assigned"
        time.sleep(1.0)
        deadline = time.monotonic() + 60
        prod = Producer(base_settings.client_config())
        e = ev.TaskHeartbeat(task_id="new-0", team="a", attempt=1, executor_id="x")
        prod.produce(topic, key=b"new-0", value=default_serde().encode(e))
        assert prod.flush(30) == 0
        while "new-0" not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        assert seen == ["new-0"], seen
    finally:
        p.stop()
        thread.join(30)
