"""Producers compress their batches (FLEETPLANE_KAFKA_COMPRESSION, lz4 by default): the same
events put fewer bytes on the wire and into the broker, a reader gets them back as they were
written, and a codec librdkafka does not know is refused naming the setting."""

from __future__ import annotations

import json
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from pydantic import ValidationError

from fleetplane.core import events as ev
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings


def _events(unique: str, n: int) -> list[ev.Event]:
    return [ev.ModelCall(task_id=f"task-{unique}-{i}", team="payments", attempt=1,
                         call_index=0, model="claude-sonnet-4", provider="anthropic",
                         tier="frontier", input_tokens=1000 + i, output_tokens=200 + i,
                         cost_usd=0.0123, latency_ms=812.5, outcome="ok",
                         stop_reason="end_turn")
            for i in range(n)]


def _wire_bytes(settings: Settings, topic: str, values: list[bytes]) -> int:
    """Bytes the producer sent to the broker for `values` (librdkafka's statistics)."""
    sent: list[int] = []

    def stats(raw: str) -> None:
        sent.append(int(json.loads(raw)["tx_bytes"]))  # requests to all brokers, on the wire

    producer = Producer({**settings.producer_config(), "statistics.interval.ms": 100,
                         "stats_cb": stats})
    producer.list_topics(topic, timeout=10)
    producer.poll(0.3)
    before = sent[-1] if sent else 0
    for i, value in enumerate(values):
        producer.produce(topic, key=b"%d" % (i % 8), value=value)
    assert producer.flush(30) == 0
    seen = len(sent)  # snapshots taken after every record was acknowledged
    deadline = time.monotonic() + 10
    while len(sent) < seen + 2 and time.monotonic() < deadline:
        producer.poll(0.1)
    return sent[-1] - before


def test_default_producers_send_compressed_batches_that_read_back_unchanged(
        base_settings: Settings, unique: str) -> None:
    assert base_settings.producer_config()["compression.type"] == "lz4"
    admin = AdminClient(base_settings.client_config())
    plain_topic, packed_topic = f"compress-none-{unique}", f"compress-lz4-{unique}"
    for future in admin.create_topics([NewTopic(plain_topic, 2, 1),
                                       NewTopic(packed_topic, 2, 1)]).values():
        future.result(30)
    serde = default_serde()
    events = _events(unique, 2000)
    values = [serde.encode(e) for e in events]

    plain = _wire_bytes(base_settings.model_copy(update={"kafka_compression": "none"}),
                        plain_topic, values)
    packed = _wire_bytes(base_settings, packed_topic, values)
    assert plain > sum(len(v) for v in values)
    assert packed < plain / 2, (packed, plain)

    consumer = Consumer({**base_settings.consumer_config(f"compress-{unique}"),
                         "enable.partition.eof": True})
    consumer.assign([TopicPartition(packed_topic, p, 0) for p in (0, 1)])
    read: list[ev.Event] = []
    ended: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        while len(ended) < 2 and time.monotonic() < deadline:
            for m in consumer.consume(500, 1.0):
                if m.error():
                    ended.add(m.partition() or 0)
                else:
                    read.append(serde.decode(m.value() or b""))
    finally:
        consumer.close()
    assert sorted(read, key=lambda e: e.task_id) == sorted(events, key=lambda e: e.task_id)


def test_an_unknown_codec_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETPLANE_KAFKA_COMPRESSION", "brotli")
    with pytest.raises(ValidationError, match="kafka_compression"):
        Settings()
