"""A compacted Kafka topic read as a key-value table (the tokens and the idempotency marks).

Every ingest replica reads the whole topic from the beginning into memory and keeps following it
(a background thread), so replicas agree without talking to each other; writers publish a record
per key and wait for the broker's acknowledgement. Values are JSON; a tombstone (None) deletes.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from fleetplane.core import doorbell
from fleetplane.core.errors import Retriable
from fleetplane.core.kafka import RenewingProducer
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import IdleBackoff, RawRecord
from fleetplane.core.settings import Settings

log = get_logger(__name__)

Apply = Callable[[str, dict[str, Any] | None], None]


class TopicTable:
    """Follows one or more compacted topics with one consumer and calls `appliers[topic](key,
    value)` for every record, in offset order per partition. `start()` returns once the records
    present at start-up are applied (or `catchup_timeout_s` passed; reading goes on after that).
    One consumer for all tables: on the embedded broker every idle consumer costs CPU
    (docs/operations.md, "Idle CPU")."""

    def __init__(self, settings: Settings, appliers: dict[str, Apply]) -> None:
        self.settings = settings
        self.appliers = dict(appliers)
        self.topic = ",".join(sorted(self.appliers))
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"table-{self.topic}",
                                        daemon=True)
        self.records = 0
        self.errors = 0
        #: the tables' doorbell (core.doorbell): the loops that write marks and names, and
        #: TopicWriter (tokens, repositories), ring it once their records are acknowledged; a
        #: quiet table is then probed less and less often (IdleBackoff) instead of every
        #: idle_probe_s, and a ring reads a new record within idle_probe_s (rings coalesce)
        self._bell = (doorbell.listener(settings.kafka_bootstrap, self.appliers)
                      if settings.handoff_doorbell and settings.idle_backoff_s > 0 else None)
        #: the reader's backoff once it runs (its probe and ring counts)
        self.idle: IdleBackoff | None = None

    def _consumer(self) -> Consumer:
        cfg = self.settings.consumer_config(f"fleetplane-table-{uuid.uuid4().hex[:12]}")
        cfg.update({"enable.auto.commit": False, "auto.offset.reset": "earliest"})
        cfg.pop("group.instance.id", None)
        if self.settings.idle_backoff_s > 0:
            cfg["enable.partition.eof"] = True  # positions for the idle backoff
        return Consumer(cfg)

    def start(self, catchup_timeout_s: float | None = None) -> bool:
        self._thread.start()
        timeout = (self.settings.table_catchup_timeout_s if catchup_timeout_s is None
                   else catchup_timeout_s)
        ok = self._caught_up.wait(timeout)
        if not ok:
            log.warning("table not caught up at start-up; serving what was read",
                        topic=self.topic, records=self.records)
        return ok

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self._bell is not None:
            self._bell.wake()  # a parked reader waits on its doorbell: it stops at once
        self._thread.join(5)

    def _run(self) -> None:
        consumer = self._consumer()
        try:
            targets: dict[tuple[str, int], int] = {}
            for topic in self.appliers:
                meta = consumer.list_topics(topic, timeout=30)
                parts = sorted(meta.topics[topic].partitions) if topic in meta.topics else []
                for p in parts:
                    _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                                timeout=30)
                    targets[(topic, p)] = high
            consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in targets])
            position = dict.fromkeys(targets, 0)
            if all(position[tp] >= targets[tp] for tp in targets):
                self._caught_up.set()
            idle_since = time.monotonic()
            # the tables are idle most of the time: on the embedded broker a consumer that
            # keeps fetching costs CPU in librdkafka and the broker (docs/benchmarks.md,
            # "Profiles"); parked between probes like the loops' inputs
            self.idle = idle = IdleBackoff(consumer, self.settings.idle_backoff_s,
                                           self.settings.idle_probe_s, bell=self._bell,
                                           full_probe_s=self.settings.idle_full_probe_s,
                                           quiet_probe_s=self.settings.idle_quiet_probe_s)
            while not self._stop.is_set():
                if idle.idle and self._bell is not None:
                    # rings coalesce: a parked table probes at most every idle_probe_s, as it
                    # did before it had a doorbell. Probing on every ring (each of the ingest
                    # loop's commits writes names) cost ingest 0.3-0.6 ms of CPU per task in
                    # a 60/s stream (docs/benchmarks.md, stop 28); rings that come meanwhile
                    # are taken together by the next poll
                    self._stop.wait(max(0.0, idle.probed_at + self.settings.idle_probe_s
                                        - time.monotonic()))
                first = idle.poll(0.1)
                msgs = [] if first is None else [first, *consumer.consume(499, 0)]
                for m in msgs[1:]:
                    idle.saw(m)
                for m in msgs:
                    if m.error() is not None:
                        continue
                    topic = m.topic() or ""
                    position[(topic, m.partition() or 0)] = (m.offset() or 0) + 1
                    self._apply(topic, m.key(), m.value())
                if any(m.error() is None for m in msgs):
                    idle_since = time.monotonic()
                if not self._caught_up.is_set() and (
                        all(position[tp] >= targets[tp] for tp in targets)
                        # brokers whose high watermark is approximate (tansu): idle is enough
                        or time.monotonic() - idle_since > 2.0):
                    self._caught_up.set()
                    log.info("table caught up", topic=self.topic, records=self.records)
        except KafkaException:
            log.exception("table reader failed", topic=self.topic)
        finally:
            consumer.close()
            if self._bell is not None:
                self._bell.close()

    def _apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        apply = self.appliers.get(topic)
        if key is None or apply is None:
            return
        try:
            decoded = None if value is None else json.loads(value)
            if decoded is not None and not isinstance(decoded, dict):
                raise ValueError("not a JSON object")
            apply(key.decode(), decoded)
            self.records += 1
        except (ValueError, UnicodeDecodeError):
            self.errors += 1
            log.warning("undecodable table record skipped", topic=self.topic)


def encode_value(value: dict[str, Any] | None) -> bytes | None:
    """A table value as stored on its topic: JSON with sorted keys; None is a tombstone."""
    return None if value is None else json.dumps(value, sort_keys=True).encode()


def table_record(topic: str, key: str, value: dict[str, Any] | None) -> RawRecord:
    """A table record as a loop output: published in the same transaction (or flush) that
    commits the input it was derived from."""
    return RawRecord(topic, key.encode(), encode_value(value))


class TopicWriter:
    """Publishes key -> JSON value records and waits for the broker's acknowledgement."""

    def __init__(self, settings: Settings) -> None:
        self._producer = RenewingProducer(settings.producer_config())
        self._bell_cluster = settings.kafka_bootstrap if settings.handoff_doorbell else None

    def put(self, topic: str, key: str, value: dict[str, Any] | None,
            timeout_s: float = 10.0) -> None:
        """Publish and wait for the acknowledgement; then ring the tables' doorbell for the
        partition written (every TopicTable on this host reads the record at once)."""
        errors: list[str] = []
        written: set[int] = set()

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            elif msg.partition() is not None:
                written.add(msg.partition())

        self._producer.produce(topic, key=key.encode(), value=encode_value(value),
                               on_delivery=delivered)
        if self._producer.flush(timeout_s) or errors:
            raise Retriable(f"{topic}: record not acknowledged ({errors[:1] or 'timeout'})")
        if written and self._bell_cluster is not None:
            doorbell.ring(self._bell_cluster, {topic: written})

    def close(self) -> None:
        self._producer.flush(5)


def read_all(settings: Settings, topic: str, timeout_s: float = 20.0) -> dict[str, dict[str, Any]]:
    """The table's current content, read once (for the CLI)."""
    table: dict[str, dict[str, Any]] = {}

    def apply(key: str, value: dict[str, Any] | None) -> None:
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value

    reader = TopicTable(settings, {topic: apply})
    reader.start(timeout_s)
    reader.stop()
    return table
