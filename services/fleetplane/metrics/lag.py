"""Consumer lag per consumer group and topic, read from the broker when Prometheus scrapes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleetplane.core.logging import get_logger

log = get_logger(__name__)


def open_transactions(admin: AdminClient, topics: Iterable[str] | None = None,
                      timeout_s: float = 10.0) -> dict[tuple[str, int], tuple[int, int]]:
    """Partitions whose last stable offset is behind their end: (topic, partition) -> (last
    stable offset, log end). The records in between belong to a transaction still open;
    read_committed consumers (every fleetplane service) read nothing past it until it commits
    or aborts. Normal for a moment while a service commits; a partition that stays here is a
    stuck transaction and stops everything downstream of it (docs/operations.md)."""
    meta = admin.list_topics(timeout=timeout_s)
    wanted = set(topics) if topics is not None else None
    parts = [TopicPartition(t, p) for t, tm in meta.topics.items()
             if (wanted is None or t in wanted) and not t.startswith("__")
             for p in tm.partitions]
    if not parts:
        return {}
    latest = {tp: OffsetSpec.latest() for tp in parts}  # type: ignore[no-untyped-call]
    ends = admin.list_offsets(latest, isolation_level=IsolationLevel.READ_UNCOMMITTED,
                              request_timeout=timeout_s)
    stable = admin.list_offsets(latest, isolation_level=IsolationLevel.READ_COMMITTED,
                                request_timeout=timeout_s)
    out: dict[tuple[str, int], tuple[int, int]] = {}
    for tp in parts:
        end = ends[tp].result().offset
        lso = stable[tp].result().offset
        if 0 <= lso < end:
            out[(tp.topic, tp.partition)] = (lso, end)
    return out


class ConsumerLag(Collector):
    """`fleetplane_consumer_lag{group, topic}`: records not yet committed by each consumer group
    (log end minus committed offset, summed over the group's partitions of the topic), for the
    groups whose id starts with one of `prefixes` and for `groups` (asked for even when the
    broker does not list them: the embedded broker leaves out a group whose only member is
    static and commits through the consumer's auto-commit, as accounting's). Read at most every
    `ttl_s` (a scrape costs one request per group plus one per partition)."""

    def __init__(self, client_config: dict[str, Any], prefixes: Iterable[str] = ("fleetplane",),
                 ttl_s: float = 10.0, timeout_s: float = 5.0, groups: Iterable[str] = ()
                 ) -> None:
        self.config = dict(client_config)
        self.prefixes = tuple(prefixes)
        self.groups = tuple(groups)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._lag: dict[tuple[str, str], int] = {}
        self._admin: AdminClient | None = None
        self._watermarks: Consumer | None = None

    def lag(self) -> dict[tuple[str, str], int]:
        """(group, topic) -> lag, refreshed when older than ttl_s."""
        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                try:
                    self._lag = self._read()
                except (KafkaException, RuntimeError, ValueError) as exc:
                    log.warning("consumer lag not read", error=str(exc))
                self._at = time.monotonic()
            return dict(self._lag)

    def _read(self) -> dict[tuple[str, str], int]:
        if self._admin is None:
            self._admin = AdminClient(self.config)
            self._watermarks = Consumer({**self.config, "group.id": "fleetplane-metrics-lag",
                                         "enable.auto.commit": False})
        assert self._watermarks is not None
        listed = self._admin.list_consumer_groups().result(self.timeout_s)
        groups = sorted({g.group_id for g in listed.valid if g.group_id.startswith(self.prefixes)}
                        | set(self.groups))
        lag: dict[tuple[str, str], int] = {}
        if not groups:
            return lag
        for group in groups:  # the client lists one group's offsets per request
            request = [ConsumerGroupTopicPartitions(group)]
            (future,) = self._admin.list_consumer_group_offsets(request).values()
            try:
                committed = future.result(self.timeout_s).topic_partitions
            except KafkaException as exc:  # one group's answer does not hide the others
                log.warning("consumer group offsets not read", group=group, error=str(exc))
                continue
            for tp in committed:
                if tp.offset < 0:
                    continue  # nothing committed yet on this partition
                _low, high = self._watermarks.get_watermark_offsets(
                    TopicPartition(tp.topic, tp.partition), timeout=self.timeout_s)
                key = (group, tp.topic)
                lag[key] = lag.get(key, 0) + max(0, high - tp.offset)
        return lag

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("fleetplane_consumer_lag", "Records not yet committed by a "
                                   "consumer group, per input topic", labels=["group", "topic"])
        for (group, topic), value in sorted(self.lag().items()):
            family.add_metric([group, topic], value)
        yield family

    def close(self) -> None:
        if self._watermarks is not None:
            self._watermarks.close()
