"""A table kept in memory and backed by a compacted changelog topic (the Kafka Streams state-store
model, on confluent-kafka).

The owner of the table is a transactional consume-transform-produce step (core.loop.Processor).
Each change is ``put`` into the table and returned by ``changes()`` as a RawRecord for the
changelog partition, which the step publishes beside its outputs: the changed rows, the outputs
and the input offsets commit in one Kafka transaction, or not at all.

``restore`` rebuilds the rows from the changelog partition with a read_committed consumer, from
the beginning to the end of the partition, before any input is read (call it on partition
assignment, after ``init_transactions`` of the step's producer: that fences a previous owner and
aborts its open transaction, so the end of the log is stable). Rows written by an aborted
transaction are never seen. After an aborted transaction of its own, the owner restores again
(``invalidate`` then ``restore``): the in-memory rows may hold changes that were not committed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from fleetplane.core.loop import RawRecord


@dataclass(frozen=True)
class Restored:
    """What one restore read."""

    rows: int
    records: int
    end_offset: int
    seconds: float


class RestoreTimeout(RuntimeError):
    pass


class ChangelogTable(Mapping[bytes, bytes]):
    """``key -> value`` bytes, one changelog partition. A ``None`` value is a tombstone (the key
    is deleted, and compaction drops it from the topic)."""

    def __init__(self, topic: str, partition: int = 0) -> None:
        self.topic = topic
        self.partition = partition
        self._rows: dict[bytes, bytes] = {}
        self._changed: dict[bytes, bytes | None] = {}
        self.restored: Restored | None = None

    # -- reading ---------------------------------------------------------------------------
    def __getitem__(self, key: bytes) -> bytes:
        return self._rows[key]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    # -- writing ---------------------------------------------------------------------------
    def put(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            self._rows.pop(key, None)
        else:
            self._rows[key] = value
        self._changed[key] = value

    def changes(self) -> list[RawRecord]:
        """The rows put since the last call, as changelog records (last value per key)."""
        out = [RawRecord(self.topic, key, value, self.partition)
               for key, value in self._changed.items()]
        self._changed.clear()
        return out

    def invalidate(self) -> None:
        """Forget the rows (they may hold uncommitted changes); ``restore`` reads them again."""
        self._rows.clear()
        self._changed.clear()
        self.restored = None

    # -- restore ---------------------------------------------------------------------------
    def restore(self, client_config: Mapping[str, Any], timeout_s: float = 120.0,
                batch: int = 5000) -> Restored:
        """Read the changelog partition from its beginning to its end (read_committed).

        The end is the high watermark taken before reading; a read_committed consumer reaches
        it once no transaction on the partition is open (control records included)."""
        started = time.monotonic()
        consumer = Consumer({
            **client_config,
            "group.id": f"{self.topic}-restore",  # required by librdkafka; nothing is committed
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        })
        rows: dict[bytes, bytes] = {}
        records = 0
        try:
            tp = TopicPartition(self.topic, self.partition)
            _, high = consumer.get_watermark_offsets(tp, timeout=30, cached=False)
            if high > 0:
                consumer.assign([TopicPartition(self.topic, self.partition, OFFSET_BEGINNING)])
                deadline = started + timeout_s
                while True:
                    eof = False
                    for msg in consumer.consume(batch, 0.2):
                        err = msg.error()
                        if err is not None:
                            if err.code() == KafkaError._PARTITION_EOF:
                                eof = True
                                continue
                            raise RuntimeError(f"changelog restore: {err}")
                        records += 1
                        key = msg.key() or b""
                        value = msg.value()
                        if value is None:
                            rows.pop(key, None)
                        else:
                            rows[key] = value
                    position = consumer.position([tp])[0].offset
                    if position >= high or (eof and position >= high):
                        break
                    if time.monotonic() > deadline:
                        raise RestoreTimeout(
                            f"changelog {self.topic}[{self.partition}] restore stopped at "
                            f"offset {position} of {high} after {timeout_s}s (an open "
                            f"transaction of a producer that was not fenced?)")
        finally:
            consumer.close()
        self._rows = rows
        self._changed.clear()
        self.restored = Restored(rows=len(rows), records=records, end_offset=high,
                                 seconds=round(time.monotonic() - started, 3))
        return self.restored
