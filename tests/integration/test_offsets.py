"""A committed offset beyond the log end (records lost by a broker crash): reported and reset to
the log end, on the real broker (fleetplane.core.offsets, called from core.loop on assignment)."""

from __future__ import annotations

import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from fleetplane.core import events as ev
from fleetplane.core.loop import Processor, Record
from fleetplane.core.offsets import offsets_since, reset_beyond_end
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


def test_offsets_since_starts_at_the_first_recent_record_else_the_end(
        base_settings: Settings, unique: str) -> None:
    """Partition 0: three day-old records, then two new ones -> the first new one (offset 3).
    Partition 1: two day-old records only -> its end (2): a reader started there reads what
    comes next, not the old records and not from a later end."""
    topic = f"since-{unique}"
    ensure_topics(base_settings.client_config(), [TopicSpec(topic, "task_id", 2, 1, -1,
                                                            "delete")])
    p = Producer(base_settings.client_config())
    old = int((time.time() - 86_400) * 1000)
    for partition, ages in ((0, [old, old, old, 0, 0]), (1, [old, old])):
        for ts in ages:
            p.produce(topic, value=b"x", partition=partition, timestamp=ts)
    assert p.flush(30) == 0
    c = Consumer({**base_settings.client_config(), "group.id": f"since-{unique}"})
    try:
        found = offsets_since(c, [(topic, 0), (topic, 1)], int((time.time() - 3600) * 1000))
        assert found == {(topic, 0): 3, (topic, 1): 2}
        # the ends a caller read before are the ones answered for a partition with nothing new
        assert offsets_since(c, [(topic, 1)], int((time.time() - 3600) * 1000),
                             ends={(topic, 1): 1}) == {(topic, 1): 1}
    finally:
        c.close()
