"""A brand-new executor group does not replay the whole tasks.dispatch history
(docs/executor.md, "A new group"): it starts at the dispatches of the lookback window, or where
a previous group id left off; a group with commits is left alone."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

from fleetplane.core.kafka import event_headers
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import DISPATCH
from fleetplane.executor.position import position_new_group

from .agentkit import dispatched


def committed(settings: Settings, group: str, partition: int, topic: str = DISPATCH) -> int:
    c = Consumer({**settings.consumer_config(group), "enable.auto.commit": False})
    try:
        return int(c.committed([TopicPartition(topic, partition)], timeout=30)[0].offset)
    finally:
        c.close()


def publish(settings: Settings, partition: int, ages_s: list[float], topic: str = DISPATCH
            ) -> list[int]:
    """Dispatches with timestamps `ages_s` seconds in the past; their offsets."""
    p = Producer(settings.producer_config())
    serde = default_serde()
    offsets: list[int] = []
    for age in ages_s:
        e = dispatched(f"pos-{uuid.uuid4().hex[:8]}", "p")
        p.produce(topic, key=e.task_id.encode(), value=serde.encode(e),
                  headers=event_headers(e), partition=partition,
                  timestamp=int((time.time() - age) * 1000),
                  on_delivery=lambda err, m: offsets.append(m.offset()))
        p.flush(30)
    return offsets


def test_new_group_starts_at_the_lookback_window_not_the_beginning(
        base_settings: Settings) -> None:
    # a topic of its own: on the session broker's tasks.dispatch, earlier tests' dispatches
    # (stamped minutes ago) precede these back-dated ones, and the time index rightly finds them
    topic = f"test-dispatch-{uuid.uuid4().hex[:8]}"
    old, older, recent = publish(base_settings, 0, [7200.0, 3600.0, 5.0], topic)
    assert old < older < recent
    group = f"exec-new-{uuid.uuid4().hex[:8]}"
    settings = base_settings.model_copy(update={"executor_new_group_lookback_s": 600.0})
    start = position_new_group(settings, group, topic)
    # the hour-old dispatches are not replayed; the recent one is
    assert start == {0: recent}
    assert committed(settings, group, 0, topic) == recent
    # a group with commits is left alone (a restart continues where it was)
    assert position_new_group(settings, group, topic) == {}
    assert committed(settings, group, 0, topic) == recent


def test_renamed_group_continues_where_the_previous_one_was(base_settings: Settings) -> None:
    offsets = publish(base_settings, 1, [10.0, 5.0, 1.0])
    previous = f"exec-prev-{uuid.uuid4().hex[:8]}"
    c = Consumer({**base_settings.consumer_config(previous), "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition(DISPATCH, 1, offsets[1])], asynchronous=False)
    c.close()
    settings = base_settings.model_copy(update={"executor_previous_group_id": previous})
    group = f"exec-renamed-{uuid.uuid4().hex[:8]}"
    start = position_new_group(settings, group)
    # partition 1 continues at the previous group's commit (inside the lookback window, where
    # the new-group rule alone would have started at offsets[0])
    assert start[1] == offsets[1]
    assert committed(settings, group, 1) == offsets[1]
