"""Know what the log lost: committed offsets beyond the end of the log.

A broker that loses acknowledged writes on a hard crash (the embedded broker on SIGKILL) can come
back with a partition shorter than a consumer group's committed offset. Left alone, librdkafka
answers the out-of-range fetch with ``auto.offset.reset`` (earliest: the whole partition is read
again) and, worse, records written at the lost offsets after the restart are skipped or re-read
silently. On assignment, before any record is read, ``reset_beyond_end`` compares each
partition's committed offset with its log end; a committed offset past the end is reported
loudly (an error log naming the group, partition, committed offset and end, with the count of
records lost) and the partition starts at the log end instead. The tasks whose records were in
the lost range are the reconciler's to catch (docs/operations.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, TopicPartition

from fleetplane.core.logging import get_logger
from fleetplane.core.settings import Settings

log = get_logger(__name__)

AssignHook = Callable[[Consumer, list[TopicPartition]], None]


@dataclass(frozen=True)
class Truncation:
    topic: str
    partition: int
    committed: int
    log_end: int

    @property
    def lost(self) -> int:
        return self.committed - self.log_end


def reset_beyond_end(consumer: Consumer, partitions: list[TopicPartition],
                     timeout_s: float = 30.0) -> list[Truncation]:
    """Assign `partitions`, each truncated one at its log end (the others at their committed
    offset), if any committed offset lies beyond its partition's end; returns the truncations
    (none: nothing is assigned here, the caller's assignment stands)."""
    if not partitions:
        return []
    try:
        committed = consumer.committed(
            [TopicPartition(tp.topic, tp.partition) for tp in partitions], timeout=timeout_s)
    except KafkaException as exc:
        log.warning("committed offsets unavailable: truncation not checked", error=str(exc))
        return []
    found: list[Truncation] = []
    start: dict[tuple[str, int], int] = {}
    for tp in committed:
        if tp.error is not None or tp.offset < 0:
            continue
        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                     timeout=timeout_s, cached=False)
        except KafkaException as exc:
            log.warning("log end unavailable: truncation not checked", topic=tp.topic,
                        partition=tp.partition, error=str(exc))
            continue
        if tp.offset > high:
            found.append(Truncation(tp.topic, tp.partition, tp.offset, high))
            start[(tp.topic, tp.partition)] = high
    for t in found:
        log.error("committed offset beyond the end of the log: the broker lost records; "
                  "starting at the log end", topic=t.topic, partition=t.partition,
                  committed=t.committed, log_end=t.log_end, lost_records=t.lost)
    if found:
        consumer.assign([TopicPartition(tp.topic, tp.partition,
                                        start.get((tp.topic, tp.partition), OFFSET_INVALID))
                         for tp in partitions])
    return found


def truncation_guard(inner: AssignHook | None = None) -> AssignHook:
    """An on_assign hook: `reset_beyond_end`, then `inner` (a service's own hook)."""

    def on_assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        reset_beyond_end(consumer, partitions)
        if inner is not None:
            inner(consumer, partitions)

    return on_assign


def replay_recent(consumer: Consumer, partitions: list[TopicPartition], seconds: float,
                  topics: frozenset[str] | None = None, timeout_s: float = 30.0,
                  until: dict[tuple[str, int], int] | None = None) -> int:
    """Assign `partitions` so that those of `topics` (default: all) start `seconds` before now
    where the group's committed offset is later than that (never later than the committed
    offset, nor past the log end; the others start at their committed offsets); returns how
    many records are read again. For a step whose consumer tolerates a record read twice: after
    a hard crash the broker can keep a group's offsets yet lose the records a transaction wrote
    with them downstream (docs/reliability.md, "Stop 20"), and reading the recent input again is
    how the step writes them again. Nothing is assigned when nothing is read again. `until`
    (if given) gets, per partition read again, the offset where the records read again end
    (the committed one): a step can tell a record read again from a new one."""
    again_of = [tp for tp in partitions if topics is None or tp.topic in topics]
    if not again_of or seconds <= 0:
        return 0
    since_ms = int((time.time() - seconds) * 1000)
    try:
        committed = consumer.committed(
            [TopicPartition(tp.topic, tp.partition) for tp in again_of], timeout=timeout_s)
        recent = consumer.offsets_for_times(
            [TopicPartition(tp.topic, tp.partition, since_ms) for tp in again_of],
            timeout=timeout_s)
    except KafkaException as exc:
        log.warning("recent offsets unavailable: nothing read again", error=str(exc))
        return 0
    at_time = {(tp.topic, tp.partition): tp.offset for tp in recent if tp.error is None}
    start: dict[tuple[str, int], int] = {}
    again = 0
    for tp in committed:
        key = (tp.topic, tp.partition)
        if tp.error is not None or tp.offset < 0:
            continue  # no committed position: the offset reset decides
        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(*key), timeout=timeout_s,
                                                     cached=False)
        except KafkaException:
            continue
        position = min(tp.offset, high)  # a truncated log starts at its end (reset_beyond_end)
        offset = at_time.get(key, -1)
        first = position if offset < 0 else min(offset, position)  # -1: nothing that recent
        if first != tp.offset:
            start[key] = first
            again += position - first
            if until is not None:
                until[key] = position
    if start:
        consumer.assign([TopicPartition(tp.topic, tp.partition,
                                        start.get((tp.topic, tp.partition), OFFSET_INVALID))
                         for tp in partitions])
    if again:
        log.warning("reading the recent input again", seconds=seconds, records=again,
                    partitions={f"{t}[{p}]": o for (t, p), o in start.items()})
    return again


def offsets_since(consumer: Consumer, partitions: list[tuple[str, int]], since_ms: int,
                  timeout_s: float = 30.0, ends: dict[tuple[str, int], int] | None = None
                  ) -> dict[tuple[str, int], int]:
    """Per partition, the offset of its first record written at or after `since_ms`, else its
    end as read *before* the lookup (`ends` if the caller has them): a record written after
    that end and before the lookup would have been found by it, so nothing is skipped, while
    an end read after the lookup (or OFFSET_END, resolved later still) would skip what came
    between. A partition the broker cannot answer for is left out (logged); a failure of the
    whole lookup raises KafkaException."""
    before = dict(ends) if ends is not None else {
        key: consumer.get_watermark_offsets(TopicPartition(*key), timeout=timeout_s,
                                            cached=False)[1]
        for key in partitions}
    found = consumer.offsets_for_times(
        [TopicPartition(t, p, since_ms) for t, p in partitions], timeout=timeout_s)
    out: dict[tuple[str, int], int] = {}
    for tp in found:
        key = (tp.topic, tp.partition)
        if tp.error is not None:
            log.warning("offset by time unavailable", topic=tp.topic, partition=tp.partition,
                        error=str(tp.error))
        else:
            out[key] = tp.offset if tp.offset >= 0 else before[key]
    return out


def _committed_of(settings: Settings, group: str, parts: list[TopicPartition]
                  ) -> dict[tuple[str, int], int]:
    c = Consumer({**settings.consumer_config(group), "enable.auto.commit": False})
    try:
        return {(tp.topic, tp.partition): tp.offset
                for tp in c.committed(parts, timeout=30) if tp.offset >= 0}
    finally:
        c.close()


def position_new_group(settings: Settings, group: str, topics: list[str], lookback_s: float,
                       previous_group: str = "") -> dict[tuple[str, int], int]:
    """Commit start offsets for the partitions of `topics` that `group` has none for, so that
    a brand-new group (a renamed group id, a fresh deployment on an old cluster, a group whose
    offsets the broker expired after ``offsets.retention.minutes`` idle) does not replay the
    topics' whole retention through ``auto.offset.reset=earliest``. Each such partition starts
    where `previous_group` committed (if given and committed there), else at its first record
    of the last `lookback_s` seconds (the end if none). Partitions with a committed offset are
    left alone (a restart continues there). Returns the offsets committed; best effort: a
    failure is logged and the group starts by its offset reset."""
    c = Consumer({**settings.consumer_config(group), "enable.auto.commit": False})
    try:
        parts = []
        for topic in topics:
            meta = c.list_topics(topic, timeout=30).topics.get(topic)
            if meta is not None and meta.error is None:
                parts += [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        if not parts:
            return {}
        have = {(tp.topic, tp.partition) for tp in c.committed(parts, timeout=30)
                if tp.offset >= 0}
        missing = [tp for tp in parts if (tp.topic, tp.partition) not in have]
        if not missing:
            return {}
        start: dict[tuple[str, int], int] = {}
        if previous_group:
            start.update(_committed_of(settings, previous_group, missing))
        rest = [tp for tp in missing if (tp.topic, tp.partition) not in start]
        if rest:
            since = int((time.time() - lookback_s) * 1000)
            start.update(offsets_since(c, [(tp.topic, tp.partition) for tp in rest], since))
        c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in start.items()],
                 asynchronous=False)
        log.info("new consumer group positioned", group=group,
                 offsets={f"{t}[{p}]": o for (t, p), o in start.items()},
                 previous_group=previous_group or None, lookback_s=lookback_s)
        return start
    except KafkaException as exc:
        log.warning("could not position the new consumer group; it starts by its offset reset",
                    group=group, reason=str(exc)[:300])
        return {}
    finally:
        c.close()
