"""Purging the scheduler topic: the repartition's copies, once the schedule step committed them.

The scheduler topic (``fleetplane-coordinator-scheduler``) is the coordinator's own repartition
topic: every input the schedule step needs, copied onto one partition, plus the clock's ticks.
Once the schedule step has committed its offset past a record, nothing reads it again: the
table is restored from the changelog, a takeover reads only the latest ticks (``find_owner``)
and the reconciler only the topic's offsets. Kafka Streams purges its repartition topics the
same way (DeleteRecords up to the committed offset).

Why it matters here: the embedded broker (noida-db 0.2.3) writes its whole state, every record
of every topic, to one JSON file about once a second, and hand-offs stall around the writes. In an
open loop at 100 tasks/s the file grew to 72 MB in 30 s, and half of the hand-off stalls of
150-235 ms that make the p99 ended within 100 ms of a write (docs/benchmarks.md, stop 23).
The scheduler topic was the largest part of it (5.9 of 22 MB of records).

What is kept: every record committed less than ``keep_s`` ago (the latest ticks a standby
reads back on takeover are among them), and everything not yet committed. Best effort: a
failed purge is logged and tried again at the next round.
"""

from __future__ import annotations

import time
from collections import deque

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from fleetplane.core.logging import get_logger
from fleetplane.core.settings import Settings

log = get_logger(__name__)


class CommittedPurger:
    """Deletes a partition's records below the offset its group committed ``keep_s`` ago."""

    def __init__(self, settings: Settings, topic: str, group: str, keep_s: float,
                 partition: int = 0) -> None:
        config = settings.client_config()
        self.tp = TopicPartition(topic, partition)
        self.keep_s = keep_s
        self.admin = AdminClient(config)
        # reads the group's committed offset only (never subscribes: never joins the group)
        self.offsets = Consumer({**config, "group.id": group, "enable.auto.commit": False})
        #: (when, committed offset) looked at, oldest first
        self.seen: deque[tuple[float, int]] = deque()
        self.purged_to = -1
        self.purges = 0

    def round(self, now: float | None = None) -> int | None:
        """Look at the committed offset and purge what was committed ``keep_s`` ago; the new
        start of the partition, or None when nothing was purged."""
        now = time.monotonic() if now is None else now
        try:
            committed = self.offsets.committed([self.tp], timeout=5)[0].offset
        except KafkaException as exc:
            log.warning("scheduler purge: committed offset not read", error=str(exc)[:300])
            return None
        if committed >= 0:
            self.seen.append((now, committed))
        target = -1
        while self.seen and now - self.seen[0][0] >= self.keep_s:
            target = max(target, self.seen.popleft()[1])
        if target <= self.purged_to:
            return None
        try:
            futures = self.admin.delete_records(
                [TopicPartition(self.tp.topic, self.tp.partition, target)],
                request_timeout=10)
            for future in futures.values():
                future.result(10)
        except (KafkaException, ValueError) as exc:
            log.warning("scheduler purge failed", offset=target, error=str(exc)[:300])
            return None
        self.purged_to = target
        self.purges += 1
        return target

    def close(self) -> None:
        self.offsets.close()
