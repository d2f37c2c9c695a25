"""Reading fleetplane's topics from your own code: the stream-consumer kit (docs/consumers.md).

Every fleetplane topic carries Avro single-object encoded events (core.serde): the 10-byte header
names the writer schema by fingerprint, so one topic carries several event types and records
written by older versions decode into today's types (fields are only ever added, with defaults).

    from fleetplane.stream import decode, read_to_end, follow

    for rec in read_to_end("127.0.0.1:9092", ["tasks.outcomes"]):
        print(rec.topic, rec.offset, rec.event)          # a typed event, or rec.error

    for rec in follow("127.0.0.1:9092", ["tasks.outcomes"], group="my-dashboard"):
        ...                                              # committed after your loop body

`read_to_end` reads committed records from the beginning up to each partition's end *at the time
of the call* (audits, checks, rebuilding a view); `follow` is a consumer-group subscription that
commits a record's offset after your loop body handled it (at-least-once). For faust, see
`fleetplane.stream.faust` (a codec and an example agent).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from fleetplane.core.events import EVENT_TYPES, Event
from fleetplane.core.serde import DecodeError, Serde, default_serde
from fleetplane.core.settings import Settings

__all__ = ["EVENT_TYPES", "DecodeError", "Event", "StreamRecord", "decode", "follow",
           "read_to_end"]

Source = str | Settings  # a bootstrap address, or the settings of a fleetplane deployment


@dataclass(frozen=True)
class StreamRecord:
    """One record of a fleetplane topic: `event` decoded, or `error` saying why it is not (a
    dead letter's original bytes, another producer's garbage): reading never stops on one."""

    topic: str
    partition: int
    offset: int
    key: str
    event: Event | None
    error: str | None = None
    timestamp_ms: int = 0


def decode(value: bytes, serde: Serde | None = None) -> Event:
    """The typed event a record value holds (any schema version fleetplane wrote);
    DecodeError otherwise."""
    return (serde or default_serde()).decode(value)


def _config(source: Source, group: str) -> dict[str, Any]:
    if isinstance(source, Settings):
        return source.consumer_config(group)
    return {"bootstrap.servers": source, "group.id": group, "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "isolation.level": "read_committed"}


def _record(msg: Any, serde: Serde) -> StreamRecord:
    key = (msg.key() or b"").decode("utf-8", "replace")
    _kind, ts = msg.timestamp()
    event: Event | None = None
    error: str | None = None
    try:
        event = serde.decode(msg.value() or b"")
    except DecodeError as exc:
        error = str(exc)
    return StreamRecord(topic=msg.topic() or "", partition=msg.partition() or 0,
                        offset=msg.offset() or 0, key=key, event=event, error=error,
                        timestamp_ms=int(ts or 0))


def read_to_end(source: Source, topics: Iterable[str], *,
                wanted: Callable[[str], bool] | None = None,
                timeout_s: float = 120.0, serde: Serde | None = None) -> Iterator[StreamRecord]:
    """Every committed record of `topics` (whose key satisfies `wanted`, if given), from the
    beginning up to each partition's end at the time of the call, topic by topic, in offset
    order per partition. Stops at `timeout_s` (TimeoutError) rather than waiting for good."""
    serde = serde or default_serde()
    consumer = Consumer({**_config(source, f"fleetplane-reader-{uuid.uuid4().hex[:8]}"),
                         "enable.auto.commit": False, "log_level": 2})
    deadline = time.monotonic() + timeout_s
    try:
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            ends: dict[int, int] = {}
            for p in (meta.partitions if meta is not None else {}):
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high > 0:
                    ends[p] = high
            if not ends:
                continue
            consumer.assign([TopicPartition(topic, p, 0) for p in ends])
            done: set[int] = set()
            while len(done) < len(ends):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{topic}: not read to its end in {timeout_s:.0f}s")
                for msg in consumer.consume(5000, 0.5):
                    if msg.error() is not None:
                        continue
                    p, offset = msg.partition() or 0, msg.offset() or 0
                    if offset + 1 >= ends[p]:
                        done.add(p)
                    if wanted is None or wanted((msg.key() or b"").decode("utf-8", "replace")):
                        yield _record(msg, serde)
                # the last records of a partition may be transaction markers, never delivered:
                # the position says when the partition is consumed
                for tp in consumer.position([TopicPartition(topic, p) for p in ends
                                             if p not in done]):
                    if tp.offset >= ends[tp.partition]:
                        done.add(tp.partition)
            consumer.unassign()
    finally:
        consumer.close()


def follow(source: Source, topics: Iterable[str], *, group: str,
           poll_s: float = 1.0, stop: Callable[[], bool] = lambda: False,
           serde: Serde | None = None) -> Iterator[StreamRecord]:
    """Follow `topics` as consumer group `group` (new groups start at the beginning). A
    record's offset is committed when the loop asks for the next one, so a crash in your loop
    body redelivers it (at-least-once: make your handling idempotent, e.g. by event_id).
    `stop()` is checked between polls."""
    serde = serde or default_serde()
    consumer = Consumer({**_config(source, group), "enable.auto.commit": True,
                         "enable.auto.offset.store": False})
    consumer.subscribe(list(topics))
    try:
        while not stop():
            msg = consumer.poll(poll_s)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise RuntimeError(f"consumer error: {err}")
            yield _record(msg, serde)
            consumer.store_offsets(msg)
    finally:
        consumer.close()
