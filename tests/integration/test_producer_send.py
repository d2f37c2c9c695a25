"""EventProducer.send with more events than the producer's local queue holds: it waits for the
queue to drain instead of raising librdkafka's BufferError ("Local: Queue full"), and every
event reaches the broker once. The bench's sink run found it: 256,000 events in one send raised
at the 100,000th (queue.buffering.max.messages' default)."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import topic_for


def _calls(unique: str, n: int) -> list[ev.Event]:
    return [ev.ModelCall(task_id=f"send-{unique}-{i}", team="payments", attempt=1,
                         call_index=0, model="claude-haiku-4-5", provider="anthropic",
                         tier="small", input_tokens=10, output_tokens=2, cost_usd=0.0001,
                         latency_ms=1.0, outcome="ok")
            for i in range(n)]


def test_send_waits_for_a_full_local_queue_and_delivers_every_event_once(
        base_settings: Settings, unique: str) -> None:
    settings = base_settings.model_copy(update={"kafka_config": {
        **base_settings.kafka_config, "queue.buffering.max.messages": "500"}})
    events = _calls(unique, 5_000)   # ten times what the queue holds
    topic = topic_for(events[0])
    # read_uncommitted: these records are not transactional, and another test's producer
    # left with an open transaction on the shared broker must not hold them back
    reader = Consumer({**base_settings.consumer_config(f"send-{unique}"),
                       "enable.auto.commit": False, "isolation.level": "read_uncommitted"})
    try:
        parts = reader.list_topics(topic, timeout=10).topics[topic].partitions
        before = {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                  for p in parts}
        producer = EventProducer(settings)
        try:
            producer.send(events, timeout_s=60)
        finally:
            producer.close()
        after = {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                 for p in parts}
        reader.assign([TopicPartition(topic, p, before[p]) for p in parts if after[p] > before[p]])
        serde = default_serde()
        seen: list[str] = []
        left = sum(after[p] - before[p] for p in parts)
        while left > 0:
            msgs = reader.consume(1000, 10)
            assert msgs, f"{left} records not read back"
            for msg in msgs:
                assert msg.error() is None, msg.error()
                left -= 1
                event = serde.decode(msg.value() or b"")
                if event.task_id.startswith(f"send-{unique}-"):
                    seen.append(event.task_id)
    finally:
        reader.close()
    assert sorted(seen) == sorted(e.task_id for e in events)
