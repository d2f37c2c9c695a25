"""The scheduler topic's purge (coordinator/purge.py) on the real broker: what the group
committed long enough ago is deleted, what it has not committed (or committed recently) stays
readable."""

from __future__ import annotations

import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fleetplane.coordinator.purge import CommittedPurger
from fleetplane.coordinator.topology import SCHEDULER_TOPIC
from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import Settings
from tests.integration.test_coordinator import CoordinatorProcess, routed


def test_records_committed_keep_s_ago_are_deleted_and_the_rest_stays(
        base_settings: Settings, unique: str) -> None:
    topic, group = f"test-purge-{unique}", f"test-purge-{unique}"
    config = base_settings.client_config()
    admin = AdminClient(config)
    for fut in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        fut.result()
    producer = Producer(base_settings.producer_config())
    for i in range(100):
        producer.produce(topic, key=str(i).encode(), value=b"x" * 100)
        producer.flush(10)  # a batch per record: a purge can end at any of them
    committer = Consumer({**config, "group.id": group, "enable.auto.commit": False})
    tp = TopicPartition(topic, 0)

    def commit(offset: int) -> None:
        committer.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)

    def low() -> int:
        return int(committer.get_watermark_offsets(tp, timeout=10, cached=False)[0])

    purger = CommittedPurger(base_settings, topic, group, keep_s=10.0)
    try:
        commit(80)
        assert purger.round(now=1000.0) is None  # committed only now: kept
        assert low() == 0
        commit(95)
        assert purger.round(now=1011.0) == 80  # 80 was committed 11 s ago, 95 just now
        assert low() == 80
        assert purger.round(now=1015.0) is None
        assert purger.round(now=1022.0) == 95
        assert low() == 95

        reader = Consumer({**config, "group.id": f"{group}-reader",
                           "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        reader.assign([TopicPartition(topic, 0, 0)])
        keys = []
        while len(keys) < 5:
            for msg in reader.consume(10, 5.0):
                if msg.error() is None:
                    keys.append(int(msg.key()))
        reader.close()
        assert keys == [95, 96, 97, 98, 99]  # nothing the group has not committed is gone
    finally:
        purger.close()
        committer.close()


def test_the_active_coordinator_purges_its_scheduler_topic(
        base_settings: Settings, producer: EventProducer, unique: str, tmp_path: Path) -> None:
    """A coordinator with a 1 s keep: once tasks went through its schedule step, the start of
    the scheduler topic moves up (the records the step committed are deleted)."""
    config = base_settings.client_config()
    watch = Consumer({**config, "group.id": f"purge-watch-{unique}"})
    tp = TopicPartition(SCHEDULER_TOPIC, 0)
    proc = CoordinatorProcess(base_settings, tmp_path, f"purge-{unique}",
                              env={"FLEETPLANE_COORDINATOR_PURGE_KEEP_S": "1"})
    try:
        proc.start()
        proc.wait_ready()
        start = watch.get_watermark_offsets(tp, timeout=10, cached=False)[0]
        producer.send([routed(f"{unique}-{i}") for i in range(20)])
        deadline = time.monotonic() + 60
        while watch.get_watermark_offsets(tp, timeout=10, cached=False)[0] <= start:
            assert time.monotonic() < deadline, f"never purged: {proc.log_tail()}"
            time.sleep(0.5)
    finally:
        proc.terminate()
        watch.close()
