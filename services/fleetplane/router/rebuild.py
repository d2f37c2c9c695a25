"""Rebuild the router's state at start-up from the topics (its memory survives a restart).

Reads, up to their end at start-up and in this order: router.holds (every budget hold, however
old: fleetplane.router.holds), then from the lookback (``router_rebuild_lookback_s``)
tasks.routed (what was routed, to which model, with which spec), tasks.lifecycle (escalations,
budget holds, failed attempts), tasks.outcomes (completions fill the statistics and the cache;
terminal events close tasks), fleet.budget whole (the latest status per team); then
tasks.accepted, only for the specs of tasks still held. Every event goes through
``RouterState.apply``, the fold the live router uses, so the rebuilt state is the state the
router had within the lookback (read_committed: aborted outputs are not seen). The processor
then resumes from the group's committed offsets; what it re-reads is applied idempotently.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from fleetplane.core import events as ev
from fleetplane.core.errors import NotRetriable
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import headers_dict
from fleetplane.core.offsets import offsets_since
from fleetplane.core.serde import Serde, default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ACCEPTED, BUDGET, LIFECYCLE, OUTCOMES, ROUTED
from fleetplane.router import holds
from fleetplane.router.holds import HOLDS_TOPIC
from fleetplane.router.shared import STATS_TOPIC, apply_record
from fleetplane.router.state import RouterState

log = get_logger(__name__)

#: Event types each topic contributes (others, e.g. heartbeats, are skipped before decoding).
WANTED: dict[str, frozenset[str]] = {
    ROUTED: frozenset({"TaskRouted"}),
    LIFECYCLE: frozenset({"TaskEscalated", "TaskHeld", "TaskFailed"}),
    OUTCOMES: frozenset({"TaskCompleted", "TaskFailed", "TaskAbandoned", "TaskCancelled",
                         "TaskRolledBack"}),
    BUDGET: frozenset({"BudgetStatus"}),
    ACCEPTED: frozenset({"TaskAccepted"}),
}


def read_messages(settings: Settings, topic: str, timeout_s: float = 120.0,
                  since_s: float | None = None) -> Iterator[Message]:
    """Every record of `topic` from the beginning (or from the first written at or after the
    epoch time `since_s`) to its end at call time (read_committed). Fails when `timeout_s`
    pass without a record: a stalled read, not a long one. (Until stop 29 it failed when the
    whole read took longer, so a router could not start once a topic held more than ~120 s of
    records: tasks.outcomes keeps 90 days of a fleet.)"""
    consumer = Consumer({**settings.consumer_config(f"router-rebuild-{uuid.uuid4().hex}"),
                         "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        meta = consumer.list_topics(topic, timeout=30).topics.get(topic)
        if meta is None or not meta.partitions:
            return
        ends: dict[int, int] = {}
        starts: dict[int, int] = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            if high > low:
                ends[p], starts[p] = high, low
        if since_s is not None and starts:
            _start_at(consumer, topic, int(since_s * 1000), starts, ends)
        assign = [TopicPartition(topic, p, o) for p, o in starts.items()]
        if not assign:
            return
        consumer.assign(assign)
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rebuild: {topic}: nothing read for {timeout_s}s before "
                                   f"its end (partitions left: {sorted(ends)})")
            msgs = consumer.consume(1000, 0.5)
            if msgs:
                deadline = time.monotonic() + timeout_s  # progress: the read goes on
            for msg in msgs:
                p = msg.partition() or 0
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        ends.pop(p, None)
                    continue
                if (msg.offset() or 0) + 1 >= ends.get(p, 0):
                    ends.pop(p, None)  # (read_committed: control records may end a partition)
                yield msg
    finally:
        consumer.close()


def _start_at(consumer: Consumer, topic: str, since_ms: int, starts: dict[int, int],
              ends: dict[int, int]) -> None:
    """Move each partition's start to its first record written at or after `since_ms`; drop
    the partitions with none before their end. Where the broker cannot say, the partition is
    read from its start, as without a lookback."""
    try:
        found = offsets_since(consumer, [(topic, p) for p in starts], since_ms,
                              ends={(topic, p): e for p, e in ends.items()})
    except KafkaException as exc:
        log.warning("offsets by time unavailable: reading from the start", topic=topic,
                    error=str(exc))
        return
    for (_, p), offset in found.items():
        if offset >= ends[p]:
            del starts[p], ends[p]  # nothing that recent
        else:
            starts[p] = max(offset, starts[p])


def read_topic(settings: Settings, topic: str, serde: Serde,
               keep: Callable[[bytes | None], bool] | None = None,
               timeout_s: float = 120.0, since_s: float | None = None) -> Iterator[ev.Event]:
    """Every wanted event of `topic` from the beginning (or `since_s`) to its end at call
    time."""
    for _, event in read_positioned(settings, topic, serde, keep, timeout_s, since_s):
        yield event


def read_positioned(settings: Settings, topic: str, serde: Serde,
                    keep: Callable[[bytes | None], bool] | None = None,
                    timeout_s: float = 120.0, since_s: float | None = None
                    ) -> Iterator[tuple[tuple[int, int], ev.Event]]:
    """Like read_topic, with each event's (partition, offset)."""
    wanted = WANTED[topic]
    for msg in read_messages(settings, topic, timeout_s, since_s):
        etype = headers_dict(msg.headers()).get("event_type")
        if etype is not None and etype.decode() not in wanted:
            continue
        if keep is not None and not keep(msg.key()):
            continue
        try:
            event = serde.decode(msg.value() or b"")
        except NotRetriable:
            continue  # undecodable records are the DLQ's business, not state
        if type(event).__name__ in wanted:
            yield (msg.partition() or 0, msg.offset() or 0), event


def committed_offsets(settings: Settings, group_id: str, topics: list[str]) -> dict[
        tuple[str, int], int]:
    """The consumer group's committed offset of every partition of `topics` (absent: none)."""
    consumer = Consumer({**settings.consumer_config(group_id), "enable.auto.commit": False})
    try:
        tps = []
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=30).topics.get(topic)
            if meta is not None:
                tps += [TopicPartition(topic, p) for p in meta.partitions]
        if not tps:
            return {}
        return {(tp.topic, tp.partition): tp.offset
                for tp in consumer.committed(tps, timeout=30) if tp.offset >= 0}
    finally:
        consumer.close()


def restore_shared(state: RouterState, settings: Settings, replica: str) -> int:
    """The shared statistics (fleetplane.router.shared) from the compacted topic: every
    replica's latest cells, this replica's per-prompt weights. Returns the records applied."""
    n = 0
    for msg in read_messages(settings, STATS_TOPIC):
        if msg.value() is None:
            continue
        try:
            value = json.loads(msg.value() or b"")
            n += apply_record(replica, value, state.stats, state.signal, restoring=True)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("router.stats record ignored", offset=msg.offset(), error=str(exc))
    state.stats.dirty.clear()  # what was restored is on the topic already
    return n


def restore_holds(state: RouterState, settings: Settings) -> set[str]:
    """The budget holds on router.holds (fleetplane.router.holds): the latest record of each
    task, a tombstone ending it. Returns the task ids restored."""
    latest: dict[str, bytes | None] = {}
    for msg in read_messages(settings, HOLDS_TOPIC):
        latest[(msg.key() or b"").decode()] = msg.value()
        state.holds_read_to = max(state.holds_read_to, (msg.offset() or 0) + 1)
    restored = set()
    for task_id, value in latest.items():
        if value is None:
            continue
        try:
            tid, rec = holds.parse(json.loads(value))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("router.holds record ignored", held_task=task_id, error=str(exc))
            continue
        if state.restore_hold(tid, rec):
            restored.add(tid)
    return restored


def rebuild(state: RouterState, settings: Settings, serde: Serde | None = None,
            replica: str | None = None, group_id: str = "fleetplane-router") -> dict[str, int]:
    """Fold the topics into `state`; returns how many events each topic contributed.

    The budget holds come from router.holds, whatever their age; the task topics are read
    from `router_rebuild_lookback_s` back (0: from their start), fleet.budget whole (the
    latest status of every team). With `replica` (shared statistics on): the statistics come
    from the shared state topic, and outcomes below the group's committed offsets (which the
    topic's cells already count) close their tasks without being counted again; only the ones
    after them are counted."""
    serde = serde or default_serde()
    started = time.monotonic()
    lookback = settings.router_rebuild_lookback_s
    since_s = time.time() - lookback if lookback > 0 else None
    counts: dict[str, int] = {}
    committed: dict[tuple[str, int], int] | None = None
    if replica is not None:
        counts[STATS_TOPIC] = restore_shared(state, settings, replica)
        committed = committed_offsets(settings, group_id, [LIFECYCLE, OUTCOMES])
    restored = restore_holds(state, settings)
    counts[HOLDS_TOPIC] = len(restored)
    for topic in (ROUTED, LIFECYCLE, OUTCOMES, BUDGET):
        n = 0
        for (partition, offset), event in read_positioned(
                settings, topic, serde, since_s=None if topic == BUDGET else since_s):
            if committed is not None:
                state.counting = offset >= committed.get((topic, partition), 0)
            state.apply(event)
            n += 1
        state.counting = True
        counts[topic] = n
    missing = {tid for tid, rec in state.tasks.items() if rec.spec is None}
    n = 0
    if missing:
        keys = {t.encode() for t in missing}
        for event in read_topic(settings, ACCEPTED, serde, keep=lambda k: k in keys,
                                since_s=since_s):
            state.apply(event)
            n += 1
    counts[ACCEPTED] = n
    # router.holds made whole: tombstones for holds that ended in the history read, records
    # for holds found only there (held before the topic existed)
    waiting = {tid for tid, rec in state.tasks.items() if rec.waiting}
    state.hold_changes = (restored - waiting) | (waiting - restored)
    log.info("router state rebuilt", seconds=round(time.monotonic() - started, 3),
             events=counts, open_tasks=len(state.tasks), held=len(waiting),
             lookback_s=lookback, stats=len(state.stats),
             replicas=sorted(state.stats.replicas()), cache_entries=len(state.cache))
    return counts
