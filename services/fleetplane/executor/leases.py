"""Durable attempt leases (issue 13, build 3).

Before its first model call an attempt is claimed: its `TaskStarted` carries `lease_ms` and is
published and acknowledged by the broker (durable) before the agent runs; every `TaskHeartbeat`
renews the lease (live until `occurred_at + lease_ms`). Every executor reads the claims and
outcomes of the whole fleet from `tasks.lifecycle` and `tasks.outcomes` (`LeaseTable`: a consumer
without group membership, assigned every partition from `lookback_s` ago, then following the
topics), so a dispatch redelivered to another executor (rebalance, restart elsewhere) is
judged against the claim:

* live and held by another executor: not run (the holder reports the outcome; if it dies its
  heartbeats stop and the coordinator declares the attempt lost after its heartbeat timeout);
* held by this executor id (a previous incarnation: this process never ran it), or expired:
  the attempt was interrupted; it is reported `lost_executor` (final=false), not run again, so
  the model is never called twice for one attempt;
* finished (a TaskCompleted, TaskFailed or TaskRolledBack of that attempt on tasks.lifecycle
  or tasks.outcomes): not run, nothing reported (its outcome is already published);
* no claim: the attempt is claimed and run.

The executor's own journal is consulted first (a finished attempt is answered from it)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from confluent_kafka import OFFSET_END, Consumer, KafkaError, TopicPartition

from fleetplane.core.events import (
    TaskCompleted,
    TaskFailed,
    TaskHeartbeat,
    TaskRolledBack,
    TaskStarted,
)
from fleetplane.core.logging import get_logger
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import LIFECYCLE, OUTCOMES

log = get_logger(__name__)

_TYPES = {b"TaskStarted", b"TaskHeartbeat", b"TaskCompleted", b"TaskFailed", b"TaskRolledBack"}
_TOPICS = (LIFECYCLE, OUTCOMES)


@dataclass(frozen=True)
class Lease:
    executor_id: str
    expires_ms: int
    done: bool = False  # the attempt has an outcome (completed, failed, rolled back)

    def live(self, now_ms: int | None = None) -> bool:
        return self.expires_ms > (now_ms if now_ms is not None else int(time.time() * 1000))


class LeaseTable:
    """The fleet's attempt claims, (task_id, attempt) -> Lease, from tasks.lifecycle."""

    def __init__(self, settings: Settings, executor_id: str, lookback_s: float = 600.0) -> None:
        self.settings = settings
        self.executor_id = executor_id
        self.lookback_s = lookback_s
        self.ready = threading.Event()
        self._leases: dict[tuple[str, int], Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, task_id: str, attempt: int) -> Lease | None:
        with self._lock:
            return self._leases.get((task_id, attempt))

    def note(self, task_id: str, attempt: int, executor_id: str, expires_ms: int) -> None:
        key = (task_id, attempt)
        with self._lock:
            old = self._leases.get(key)
            if old is not None and old.done:
                return
            if old is None or expires_ms >= old.expires_ms or old.executor_id != executor_id:
                self._leases[key] = Lease(executor_id, expires_ms)

    def finished(self, task_id: str, attempt: int, at_ms: int) -> None:
        key = (task_id, attempt)
        with self._lock:
            old = self._leases.get(key)
            self._leases[key] = Lease(old.executor_id if old else "", at_ms, done=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)

    def _run(self) -> None:
        serde = default_serde()
        consumer = Consumer({**self.settings.client_config(),
                             "group.id": f"fleetplane-executor-leases-{self.executor_id}",
                             "enable.auto.commit": False, "enable.partition.eof": True,
                             "isolation.level": "read_committed"})
        try:
            pending: set[tuple[str, int]] = set()  # partitions not read to their end yet
            while not self._stop.is_set():
                meta = consumer.list_topics(timeout=10)
                found = [meta.topics.get(t) for t in _TOPICS]
                if all(m is not None and m.partitions and m.error is None for m in found):
                    since = int((time.time() - self.lookback_s) * 1000)
                    start = consumer.offsets_for_times(
                        [TopicPartition(t, p, since) for t in _TOPICS
                         for p in meta.topics[t].partitions], timeout=10)
                    for tp in start:
                        if tp.offset < 0:  # nothing since then: from the end
                            tp.offset = OFFSET_END
                    consumer.assign(start)
                    pending = {(tp.topic, tp.partition) for tp in start}
                    break
                self._stop.wait(0.5)
            log.info("reading attempt leases", topics=_TOPICS, lookback_s=self.lookback_s)
            last_prune = time.monotonic()
            while not self._stop.is_set():
                for msg in consumer.consume(500, 0.2):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF and pending:
                            pending.discard((msg.topic() or "", msg.partition() or 0))
                            if not pending:
                                self.ready.set()
                                log.info("attempt leases read", leases=len(self._leases))
                        continue
                    etype = dict(msg.headers() or []).get("event_type") or b""
                    if etype not in _TYPES:
                        continue
                    try:
                        event = serde.decode(msg.value() or b"")
                    except Exception:  # dead-lettered by the topic's own consumers
                        continue
                    at = int(event.occurred_at.timestamp() * 1000)
                    if isinstance(event, TaskStarted | TaskHeartbeat) and event.lease_ms > 0:
                        self.note(event.task_id, event.attempt, event.executor_id,
                                  at + event.lease_ms)
                    elif isinstance(event, TaskCompleted | TaskFailed | TaskRolledBack):
                        self.finished(event.task_id, event.attempt, at)
                if time.monotonic() - last_prune > 60:
                    self._prune()
                    last_prune = time.monotonic()
        finally:
            consumer.close()

    def _prune(self) -> None:
        cutoff = int((time.time() - self.lookback_s) * 1000)
        with self._lock:
            for key in [k for k, v in self._leases.items() if v.expires_ms < cutoff]:
                del self._leases[key]
