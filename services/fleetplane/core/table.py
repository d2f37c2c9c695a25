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

A standby keeps a warm copy (``follow``): a thread reads the changelog as it is written, so that
on takeover ``restore`` only reads what the previous owner committed since (the standby replica
of Kafka Streams); the restore after a takeover then costs the tail, not the whole table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

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


def _consumer(topic: str, client_config: Mapping[str, Any]) -> Consumer:
    return Consumer({
        **client_config,
        "group.id": f"{topic}-restore",  # required by librdkafka; nothing is committed
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    })


class Follower:
    """A warm copy of the changelog partition, read by a thread of its own (read_committed).

    It reads in rounds and parks in between: once a round reaches the end of the partition, the
    partition is unassigned (no fetches at all: the embedded broker answers an empty fetch at
    once, and a consumer left assigned on an idle partition re-fetches back to back, most of a
    core between client and broker, see ``core.loop.IdleBackoff``). Every ``probe_s`` it asks
    for the end of the partition (one ListOffsets request) and reads a new round only if the
    end moved. ``take`` wakes it at once and keeps it reading until the end asked for."""

    def __init__(self, topic: str, partition: int, client_config: Mapping[str, Any],
                 probe_s: float = 1.0) -> None:
        self.tp = TopicPartition(topic, partition)
        self.config = dict(client_config)
        self.probe_s = probe_s
        self.rows: dict[bytes, bytes] = {}
        self.records = 0
        self.position = 0
        self.rounds = 0  # reading rounds (each: assign, read to the end, park)
        self.error: BaseException | None = None
        self._moved = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._hurry = False
        self._thread = threading.Thread(target=self._run, name=f"follow-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            consumer = _consumer(self.tp.topic, self.config)
            try:
                self._follow(consumer)
            finally:
                consumer.close()
        except BaseException as exc:
            self.error = exc
            with self._moved:
                self._moved.notify_all()

    def _follow(self, consumer: Consumer) -> None:
        tp, position, assigned = self.tp, 0, False
        while not self._stop.is_set():
            if not assigned:
                if self.rounds and not self._hurry:  # parked: until the next look or a take
                    self._wake.wait(self.probe_s)
                    self._wake.clear()
                    if self._stop.is_set():
                        return
                try:
                    high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)[1]
                except KafkaException:
                    high = position + 1  # no answer: read a round (it waits for the broker)
                if high <= position:
                    self.rounds = max(self.rounds, 1)
                    continue
                consumer.assign([TopicPartition(tp.topic, tp.partition, position)])
                assigned = True
                self.rounds += 1
            eof = False
            # a short wait: consume() waits its whole timeout unless 5,000 records come, and
            # the client fetches back to back meanwhile (0.2 s per round: a standby spent
            # 0.2-0.45 CPU-s in librdkafka per 2,000-task burst, 0.01-0.06 now; stop 20)
            for msg in consumer.consume(5000, 0.01):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        eof = True
                        position = max(position, msg.offset() or 0)
                        continue
                    raise RuntimeError(f"changelog follow: {err}")
                self.records += 1
                key, value = msg.key() or b"", msg.value()
                if value is None:
                    self.rows.pop(key, None)
                else:
                    self.rows[key] = value
                position = max(position, (msg.offset() or 0) + 1)
            fetched = consumer.position([tp])[0].offset
            if fetched >= 0:
                position = max(position, fetched)
            with self._moved:
                self.position = position
                self._moved.notify_all()
            if eof:  # the end of the partition (its last stable offset): park
                consumer.unassign()
                assigned = False

    def take(self, end: int, timeout_s: float) -> tuple[dict[bytes, bytes], int] | None:
        """Stop at ``end`` (an offset taken after the previous owner was fenced): the rows and
        how many records were read; None if the follower failed or did not get there."""
        deadline = time.monotonic() + timeout_s
        self._hurry = True
        self._wake.set()
        with self._moved:
            while self.error is None and self.position < end and time.monotonic() < deadline:
                self._moved.wait(0.1)
        reached = self.error is None and self.position >= end
        self.stop()
        return (self.rows, self.records) if reached else None

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(10)


class ChangelogTable(Mapping[bytes, bytes]):
    """``key -> value`` bytes, one changelog partition. A ``None`` value is a tombstone (the key
    is deleted, and compaction drops it from the topic)."""

    def __init__(self, topic: str, partition: int = 0) -> None:
        self.topic = topic
        self.partition = partition
        self._rows: dict[bytes, bytes] = {}
        self._changed: dict[bytes, bytes | None] = {}
        self.restored: Restored | None = None
        self._follower: Follower | None = None

    def follow(self, client_config: Mapping[str, Any]) -> None:
        """Keep a warm copy while standing by; the next ``restore`` reads only the tail."""
        if self._follower is None:
            self._follower = Follower(self.topic, self.partition, client_config)

    def unfollow(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.stop()

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
        consumer = _consumer(self.topic, client_config)
        rows: dict[bytes, bytes] = {}
        records = 0
        follower, self._follower = self._follower, None
        try:
            tp = TopicPartition(self.topic, self.partition)
            _, high = consumer.get_watermark_offsets(tp, timeout=30, cached=False)
            warm = follower.take(high, timeout_s) if follower is not None else None
            if warm is not None:
                rows, records = warm
            elif high > 0:
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
            if follower is not None:
                follower.stop()
        self._rows = rows
        self._changed.clear()
        self.restored = Restored(rows=len(rows), records=records, end_offset=high,
                                 seconds=round(time.monotonic() - started, 3))
        return self.restored
