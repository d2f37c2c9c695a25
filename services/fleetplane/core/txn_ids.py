"""Transactional ids that never write again after an aborted transaction.

Why (measured on the embedded broker, noida-db 0.2.3; docs/operations.md): the broker keeps each
aborted transaction as (producer id, first offset) without its last offset, and returns it in
every read_committed fetch of that partition, also in fetches that start after the transaction's
abort marker. librdkafka then drops every later record of that producer id on the partition, as
if it still belonged to the aborted transaction: a consumer positioned after the marker never
sees them (a consumer that re-reads from before the marker does, until it has read past it).
A producer keeps its producer id when its transactional.id is fenced (init_transactions only
bumps the epoch), so a service restarted after a SIGKILL, or a loop that aborted a transaction,
wrote records that downstream consumers skipped: in the chaos run, completions the coordinator
never saw (it declared the attempt lost and ran it again), completions accounting never stored,
accepted tasks the router never routed.

So a transactional loop writes under a *generation* of its stable id, ``<stable>.g<N>``, and
takes a new generation (a new producer id) after every aborted transaction. The latest
generation of each stable id is kept on a compacted topic (``fleet.txn-ids``) and written before
it is used, so a restarted process knows which transactional ids its predecessor may have left
a transaction open under, and fences them (``init_transactions`` aborts the open transaction)
before it writes. On Apache Kafka the scheme is harmless (one more fenced id per restart).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from fleetplane.core.logging import get_logger
from fleetplane.core.settings import Settings

log = get_logger(__name__)

REGISTRY_TOPIC = "fleet.txn-ids"
# generations fenced after the latest registered one: a registration the broker lost in a hard
# crash (it loses its last acknowledged writes on SIGKILL) is still fenced by the next start
FENCE_AHEAD = 2
FENCE_TIMEOUT_S = 30.0
#: how long a reading of the registry serves this process's lookups (TxnIds.latest)
SNAPSHOT_S = 5.0
_snapshot: dict[str, tuple[float, dict[str, int]]] = {}
_snapshot_lock = threading.Lock()


def generation_id(stable: str, generation: int) -> str:
    return f"{stable}.g{generation}"


class TxnIds:
    """The generations of one process's transactional ids (one instance per process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._current: dict[str, int] = {}

    def next_id(self, stable: str) -> str:
        """A transactional id with a producer id that never had an aborted transaction.

        The first call for `stable` in this process fences every id a predecessor may have
        left a transaction open under; every call registers the returned generation before it
        is used."""
        if stable in self._current:
            generation = self._current[stable] + 1
        else:
            latest = self.latest(stable)
            self.fence(stable, latest)
            generation = (-1 if latest is None else latest) + FENCE_AHEAD + 1
        self._register(stable, generation)
        self._current[stable] = generation
        return generation_id(stable, generation)

    def fence(self, stable: str, latest: int | None = None) -> None:
        """Abort whatever transaction the generations `latest` .. `latest` + FENCE_AHEAD of
        `stable` left open, and fence their producers; with nothing registered, `stable`
        itself (the id a loop wrote under before generations). An earlier generation has
        nothing open: a process fences its own generation before it registers the next."""
        ids = [stable] if latest is None else [
            generation_id(stable, g) for g in range(latest, latest + FENCE_AHEAD + 1)]
        started = time.monotonic()
        for tx_id in ids:
            fence_id(self.settings, tx_id)
        log.info("fenced the transactional ids of a previous run", stable=stable,
                 ids=len(ids), seconds=round(time.monotonic() - started, 3))

    def latest(self, stable: str, fresh: bool = False) -> int | None:
        """The latest generation registered for `stable` (None: never registered).

        The registry is read once for all stable ids and the reading is shared by the process
        for SNAPSHOT_S (a coordinator's takeover asked four times, one read each: 0.6 s of its
        failover); this process's own registrations update it. `fresh` reads it again (another
        process's registration of the last seconds must be seen)."""
        with _snapshot_lock:
            key = self.settings.kafka_bootstrap
            taken = _snapshot.get(key)
            if fresh or taken is None or time.monotonic() - taken[0] > SNAPSHOT_S:
                taken = (time.monotonic(), self._read_registry())
                _snapshot[key] = taken
            return taken[1].get(stable)

    def _read_registry(self) -> dict[str, int]:
        """Every stable id's latest registered generation."""
        consumer = Consumer({**self.settings.client_config(),
                             "group.id": "fleetplane-txn-ids",
                             "enable.auto.commit": False,
                             "enable.partition.eof": True,
                             "isolation.level": "read_committed"})
        latest: dict[str, int] = {}
        try:
            parts = _partitions(consumer)
            ends = {p: consumer.get_watermark_offsets(TopicPartition(REGISTRY_TOPIC, p),
                                                      timeout=10)[1] for p in parts}
            todo = {p for p, end in ends.items() if end > 0}
            consumer.assign([TopicPartition(REGISTRY_TOPIC, p, 0) for p in todo])
            deadline = time.monotonic() + FENCE_TIMEOUT_S
            while todo and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                err, part = msg.error(), msg.partition() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        todo.discard(part)
                    continue
                if msg.key() and msg.value():
                    latest[(msg.key() or b"").decode()] = int(msg.value() or b"0")
                if (msg.offset() or 0) + 1 >= ends[part]:
                    todo.discard(part)
            if todo:
                raise RuntimeError(f"{REGISTRY_TOPIC}: not read to its end within "
                                   f"{FENCE_TIMEOUT_S:.0f}s")
        finally:
            consumer.close()
        return latest

    def _register(self, stable: str, generation: int) -> None:
        producer = Producer({**self.settings.client_config(), "acks": "all",
                             "enable.idempotence": True, "linger.ms": 0})
        errors: list[Any] = []
        producer.produce(REGISTRY_TOPIC, key=stable.encode(), value=str(generation).encode(),
                         on_delivery=lambda err, _msg: errors.append(err) if err else None)
        left = producer.flush(FENCE_TIMEOUT_S)
        if left or errors:
            raise RuntimeError(f"{REGISTRY_TOPIC}: generation {generation} of {stable} not "
                               f"acknowledged ({errors[0] if errors else 'timed out'})")
        with _snapshot_lock:
            taken = _snapshot.get(self.settings.kafka_bootstrap)
            if taken is not None:
                taken[1][stable] = generation


def _partitions(consumer: Consumer) -> list[int]:
    topics = consumer.list_topics(REGISTRY_TOPIC, timeout=10).topics
    meta = topics.get(REGISTRY_TOPIC)
    if meta is None or meta.error is not None:
        return []  # nothing registered yet: the broker creates it on the first registration
    return sorted(meta.partitions)


def fence_id(settings: Settings, tx_id: str) -> None:
    """Open and close a transactional producer with `tx_id`: the broker aborts the
    transaction the id's previous producer left open, and fences that producer."""
    producer = Producer(settings.producer_config(tx_id))
    try:
        producer.init_transactions(FENCE_TIMEOUT_S)
    except KafkaException:
        log.warning("fencing a transactional id failed", transactional_id=tx_id,
                    exc_info=True)
        raise
    finally:
        producer.flush(1)
