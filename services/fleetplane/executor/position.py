"""Where a brand-new executor group starts on tasks.dispatch (docs/executor.md, "A new group").

`auto.offset.reset=earliest` would make a new group (a renamed group id, a fresh deployment on an
old cluster) replay the whole dispatch history, and the attempt leases know only the outcomes of
the last `executor_lease_lookback_s`: older attempts would run again. So before the executor
joins, every partition without a committed offset gets one:

* the committed offset of `executor_previous_group_id`, if set and committed there (a rename
  continues where the old group was);
* otherwise the first dispatch of the last `executor_new_group_lookback_s` (default 10 min, the
  leases' window: a dispatch in it that already ran elsewhere is recognised and not re-run);
  older dispatches that never started are the coordinator's dispatched->started timeout's.

Partitions that already have a committed offset are left alone (a restart continues there)."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaException, TopicPartition

from fleetplane.core.logging import get_logger
from fleetplane.core.settings import Settings
from fleetplane.core.topics import DISPATCH

log = get_logger(__name__)


def _committed(settings: Settings, group: str, parts: list[TopicPartition]
               ) -> dict[int, int]:
    c = Consumer({**settings.consumer_config(group), "enable.auto.commit": False})
    try:
        return {tp.partition: tp.offset for tp in c.committed(parts, timeout=30)
                if tp.offset >= 0}
    finally:
        c.close()


def position_new_group(settings: Settings, group: str, topic: str = DISPATCH
                       ) -> dict[int, int]:
    """Commit start offsets for the partitions of `topic` (tasks.dispatch) `group` has none
    for; returns them (partition -> offset). Best effort: a failure is logged and the group
    starts by its offset reset."""
    c = Consumer({**settings.consumer_config(group), "enable.auto.commit": False})
    try:
        meta = c.list_topics(topic, timeout=30).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return {}
        parts = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        have = {tp.partition for tp in c.committed(parts, timeout=30) if tp.offset >= 0}
        missing = [tp for tp in parts if tp.partition not in have]
        if not missing:
            return {}
        start: dict[int, int] = {}
        if settings.executor_previous_group_id:
            previous = _committed(settings, settings.executor_previous_group_id, missing)
            start.update(previous)
        rest = [tp for tp in missing if tp.partition not in start]
        if rest:
            since = int((time.time() - settings.executor_new_group_lookback_s) * 1000)
            for tp in c.offsets_for_times([TopicPartition(topic, tp.partition, since)
                                           for tp in rest], timeout=30):
                offset = tp.offset
                if offset < 0:  # nothing that recent: the end
                    offset = c.get_watermark_offsets(tp, timeout=30)[1]
                start[tp.partition] = offset
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in start.items()],
                 asynchronous=False)
        log.info("new executor group positioned", group=group, offsets=start,
                 previous_group=settings.executor_previous_group_id or None,
                 lookback_s=settings.executor_new_group_lookback_s)
        return start
    except KafkaException as exc:
        log.warning("could not position the new executor group; it starts by its offset reset",
                    group=group, reason=str(exc)[:300])
        return {}
    finally:
        c.close()
