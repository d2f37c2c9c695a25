"""One consumer per process for every read-only topic reader.

A service often follows topics outside its consumer group (the executor: cancellations on
tasks.outcomes, the fleet's attempt leases on tasks.lifecycle and tasks.outcomes, the registered
repositories on fleet.repositories). One consumer each costs a fetch loop each, and on the
embedded broker an idle fetch loop costs CPU (core.loop.IdleBackoff). `Follower` is one consumer
without group membership, assigned every partition of the union of its readers' topics, with the
idle backoff; each reader gets the records of its topics from its own start (a time `since_s`
back, or the beginning) and is `ready` once it has read what its partitions held when it was
assigned (end-of-partition seen for each).

By default it reads ``read_uncommitted``: a transaction left open by a producer that died holds
a partition's last stable offset until the broker aborts it (never, on the embedded broker), and
a ``read_committed`` follower would stop there for every reader. Readers of transactional outputs
must then accept records whose transaction is later aborted (docs/executor.md, "Follower").
A reader that must count committed records only (the executor's finished attempts) gets a
follower of its own with ``isolation="read_committed"``; `caught_up` waits until such a follower
has read up to the ends its partitions have now (a barrier after start-up).

Pacing (``pace_s`` > 0, the executor's followers): the embedded broker answers a fetch at once,
so a consumer whose partitions get a trickle of records (the fleet's heartbeats on
tasks.lifecycle) never looks idle to the idle backoff and librdkafka re-fetches every partition
back to back (measured: 0.12 core of librdkafka threads in an executor with 2,000 attempts
waiting). A paced follower reads in rounds: every partition is fetched until it reported its end
(or `ROUND_MAX_S` passed), then the partitions are unassigned for ``pace_s`` and assigned again
at the positions reached (an assignment with explicit offsets is fetched at once, see
core.loop.IdleBackoff). A record waits at most ``pace_s`` plus a round. ``pace_s`` = 0 keeps
the idle backoff (``idle_backoff_s``/``idle_probe_s``).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from fleetplane.core.logging import get_logger
from fleetplane.core.loop import IdleBackoff
from fleetplane.core.offsets import offsets_since
from fleetplane.core.settings import Settings

log = get_logger(__name__)

OnRecord = Callable[[Message], None]

#: a paced round ends when every partition reported its end, or after this long
ROUND_MAX_S = 0.5


@dataclass
class Reader:
    """One reader of a Follower: its topics, where it starts, what it does with a record."""

    name: str
    topics: tuple[str, ...]
    on_record: OnRecord
    since_s: float | None = None  # None: from the beginning
    ready: threading.Event = field(default_factory=threading.Event)
    since_ms: int = 0
    pending: set[tuple[str, int]] = field(default_factory=set)
    records: int = 0
    errors: int = 0


class Follower:
    """Follows the topics of several readers with one consumer (a thread of its own)."""

    def __init__(self, settings: Settings, name: str = "follower",
                 isolation: str = "read_uncommitted", pace_s: float = 0.0) -> None:
        self.settings = settings
        self.name = name
        self.isolation = isolation
        self.pace_s = pace_s
        #: paced rounds so far, how long they read (assigned), and how many ended by
        #: ROUND_MAX_S rather than at every partition's end
        self.rounds = 0
        self.reading_s = 0.0
        self.full_rounds = 0
        #: per partition, how far the readers were given records (after the last one, or where
        #: an end-of-partition was reported)
        self.positions: dict[tuple[str, int], int] = {}
        self.readers: list[Reader] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.assigned = threading.Event()
        #: every (topic, partition) the follower reads, known once `assigned` is set
        self.partitions: list[tuple[str, int]] = []
        self.idle: IdleBackoff | None = None

    def follow(self, name: str, topics: Sequence[str], on_record: OnRecord, *,
               since_s: float | None = None) -> Reader:
        """Register a reader (before start())."""
        if self._thread is not None:
            raise RuntimeError("follow() after start()")
        reader = Reader(name, tuple(topics), on_record, since_s)
        self.readers.append(reader)
        return reader

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    # -- the thread ----------------------------------------------------------------------------
    def _consumer(self) -> Consumer:
        return Consumer({**self.settings.client_config(),
                         "group.id": f"fleetplane-{self.name}-{uuid.uuid4().hex[:12]}",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "isolation.level": self.isolation,
                         "auto.offset.reset": "earliest"})

    def _start_offsets(self, consumer: Consumer) -> list[TopicPartition] | None:
        """Per partition, the earliest start of the readers of its topic; None while a topic
        is not there yet."""
        topics = sorted({t for r in self.readers for t in r.topics})
        meta = consumer.list_topics(timeout=10)
        parts: dict[str, list[int]] = {}
        for t in topics:
            m = meta.topics.get(t)
            if m is None or m.error is not None or not m.partitions:
                return None
            parts[t] = sorted(m.partitions)
        now_ms = int(time.time() * 1000)
        start: dict[tuple[str, int], int] = {}
        for r in self.readers:
            r.since_ms = 0 if r.since_s is None else now_ms - int(r.since_s * 1000)
            r.pending = {(t, p) for t in r.topics for p in parts[t]}
            keys = [(t, p) for t in r.topics for p in parts[t]]
            found = {} if r.since_s is None else offsets_since(consumer, keys, r.since_ms,
                                                               timeout_s=10)
            for key in keys:  # from the beginning: no lookback, or the broker cannot say
                offset = found[key] if key in found else consumer.get_watermark_offsets(
                    TopicPartition(*key), timeout=10)[0]
                start[key] = min(start.get(key, offset), offset)
        return [TopicPartition(t, p, o if o >= 0 else OFFSET_END) for (t, p), o in start.items()]

    def _run(self) -> None:
        consumer = self._consumer()
        try:
            start: list[TopicPartition] | None = None
            while not self._stop.is_set() and start is None:
                try:
                    start = self._start_offsets(consumer)
                except KafkaException as exc:
                    log.warning("follower not assigned yet", reason=str(exc)[:300])
                if start is None:
                    self._stop.wait(0.5)
            if start is None:
                return
            consumer.assign(start)
            self.partitions = sorted((tp.topic, tp.partition) for tp in start)
            self.assigned.set()
            log.info("following", readers=[r.name for r in self.readers],
                     partitions=len(start), pace_s=self.pace_s)
            if self.pace_s > 0:
                self._paced(consumer, start)
                return
            # a partition already at its end answers with end-of-partition at once
            self.idle = IdleBackoff(consumer, self.settings.idle_backoff_s,
                                    self.settings.idle_probe_s)
            while not self._stop.is_set():
                first = self.idle.poll(0.2)
                if first is None:
                    continue
                rest = consumer.consume(499, 0)
                for msg in rest:
                    self.idle.saw(msg)
                for msg in [first, *rest]:
                    self._dispatch(msg)
        except KafkaException:
            log.exception("follower failed", follower=self.name)
        finally:
            consumer.close()

    def _paced(self, consumer: Consumer, start: list[TopicPartition]) -> None:
        """Read in rounds, `pace_s` apart (see the module's docstring)."""
        parts = {(tp.topic, tp.partition): tp for tp in start}
        open_ = set(parts)  # partitions that have not reported their end this round
        began = time.monotonic()
        while not self._stop.is_set():
            if not open_ or time.monotonic() - began > ROUND_MAX_S:
                self.reading_s += time.monotonic() - began
                self.full_rounds += 1 if open_ else 0
                try:
                    consumer.unassign()  # what was fetched and not returned is dropped: the
                    # next round starts at the positions the readers were given
                    if self._stop.wait(self.pace_s):
                        return
                    consumer.assign([TopicPartition(t, p, self.positions.get((t, p), tp.offset))
                                     for (t, p), tp in parts.items()])
                except KafkaException as exc:  # a lost broker: the next round tries again
                    log.warning("follower round not started", follower=self.name,
                                reason=str(exc)[:300])
                    self._stop.wait(self.pace_s)
                self.rounds += 1
                open_, began = set(parts), time.monotonic()
            head = consumer.poll(0.05)  # (consume(n, t) would wait t for n records)
            if head is None:
                continue
            for msg in [head, *consumer.consume(499, 0)]:
                err = msg.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    open_.discard((msg.topic() or "", msg.partition() or 0))
                self._dispatch(msg)

    def caught_up(self, timeout_s: float) -> bool:
        """Wait until every partition has been read up to the end it has now (asked of the
        broker: for a read_committed follower, its last stable offset); False after
        `timeout_s` (e.g. a dead producer's transaction holds an end the broker reports)."""
        deadline = time.monotonic() + timeout_s
        if not self.assigned.wait(timeout_s):
            return False
        # every assigned partition, read or not: a partition gets a position only once the
        # follower read a record or its end, and waiting on the positions known so far
        # returned at once for a follower that had not read yet (stop 27: an outcome sent
        # right after assignment was not found, a CI failure of test_executor_lease_sync).
        # The ends are asked with a consumer of this call's own: the follower's consumer is
        # its thread's (assignment() from here was seen to block while it polled)
        parts = self.partitions
        targets: dict[tuple[str, int], int] = {}
        probe = self._consumer()
        try:
            for topic, partition in parts:
                high = probe.get_watermark_offsets(
                    TopicPartition(topic, partition),
                    timeout=max(0.1, deadline - time.monotonic()), cached=False)[1]
                targets[(topic, partition)] = high
        except KafkaException as exc:
            log.warning("follower: partition ends not known", follower=self.name,
                        reason=str(exc)[:300])
            return False
        finally:
            probe.close()
        while True:
            behind = {k: v for k, v in targets.items() if self.positions.get(k, -1) < v}
            if not behind:
                return True
            if time.monotonic() >= deadline:
                log.warning("follower not caught up", follower=self.name,
                            behind=dict(list(behind.items())[:5]))
                return False
            time.sleep(0.01)

    def _dispatch(self, msg: Message) -> None:
        err = msg.error()
        topic, partition = msg.topic() or "", msg.partition() or 0
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                offset = msg.offset()
                if offset is not None and offset >= 0:
                    self.positions[(topic, partition)] = offset
                for r in self.readers:
                    if (topic, partition) in r.pending:
                        r.pending.discard((topic, partition))
                        if not r.pending and not r.ready.is_set():
                            r.ready.set()
                            log.info("reader caught up", reader=r.name, records=r.records)
            else:
                log.warning("follower consumer error", error=str(err))
            return
        ts_type, ts = msg.timestamp()
        for r in self.readers:
            if topic not in r.topics or (ts_type and ts < r.since_ms):
                continue
            try:
                r.on_record(msg)
                r.records += 1
            except Exception:  # a reader's bug must not stop the others
                r.errors += 1
                log.exception("follower reader failed", reader=r.name, topic=topic,
                              offset=msg.offset())
        offset = msg.offset()
        if offset is not None:
            self.positions[(topic, partition)] = offset + 1


def apply_json(apply: Callable[[str, dict[str, Any] | None], None], msg: Message) -> None:
    """A key-value topic's record (JSON object value, tombstone deletes; the format of
    ingest.kvtopic's tables) given to `apply(key, value)`."""
    key, value = msg.key(), msg.value()
    if key is None:
        return
    decoded = None if value is None else json.loads(value)
    if decoded is not None and not isinstance(decoded, dict):
        raise ValueError("not a JSON object")
    apply(key.decode(), decoded)
