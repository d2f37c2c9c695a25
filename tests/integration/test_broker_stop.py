"""The embedded broker's stop keeps what it acknowledged: `fleetplane down`, the supervisor's
teardown and the chaos run's planned restart all go through EmbeddedBroker.stop. On SIGTERM the
binary exits without writing its state (a crash, for the data); SIGINT is its clean stop."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fleetplane.infra.broker import EmbeddedBroker


def test_a_stopped_broker_restarts_with_every_acknowledged_record(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "broker")
    bootstrap = broker.start()
    try:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic("kept", 1, 1)])["kept"].result(30)
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                             "enable.idempotence": True})
        for i in range(1000):
            producer.produce("kept", str(i).encode())
            producer.poll(0)
        assert producer.flush(30) == 0, "every record acknowledged"
        broker.stop(timeout_s=4)  # then SIGKILL: a stop that is not clean in time loses data
        broker.start()
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "stop-check"})
        try:
            _low, high = consumer.get_watermark_offsets(TopicPartition("kept", 0), timeout=30)
        finally:
            consumer.close()
        assert high == 1000
    finally:
        broker.stop()
