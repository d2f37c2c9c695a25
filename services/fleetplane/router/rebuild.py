"""Rebuild the router's state at start-up from the topics (its memory survives a restart).

Reads, up to their end at start-up and in this order: tasks.routed (what was routed, to which
model, with which spec), tasks.lifecycle (escalations, budget holds, failed attempts),
tasks.outcomes (completions fill the statistics and the cache; terminal events close tasks) and
fleet.budget (the latest status per team); then tasks.accepted, only for the specs of tasks still
held. Every event goes through ``RouterState.apply``, the fold the live router uses, so the rebuilt
state is the state the router had (read_committed: aborted outputs are not seen). The processor
then resumes from the group's committed offsets; what it re-reads is applied idempotently.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from fleetplane.core import events as ev
from fleetplane.core.errors import NotRetriable
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import headers_dict
from fleetplane.core.serde import Serde, default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ACCEPTED, BUDGET, LIFECYCLE, OUTCOMES, ROUTED
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


def read_messages(settings: Settings, topic: str,
                  timeout_s: float = 120.0) -> Iterator[Message]:
    """Every record of `topic` from the beginning to its end at call time (read_committed).
    Fails when `timeout_s` pass without a record: a stalled read, not a long one. (Until stop
    29 it failed when the whole read took longer, so a router could not start once a topic
    held more than ~120 s of records: tasks.outcomes keeps 90 days of a fleet.)"""
    consumer = Consumer({**settings.consumer_config(f"router-rebuild-{uuid.uuid4().hex}"),
                         "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        meta = consumer.list_topics(topic, timeout=30).topics.get(topic)
        if meta is None or not meta.partitions:
            return
        ends: dict[int, int] = {}
        assign = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            if high > low:
                ends[p] = high
                assign.append(TopicPartition(topic, p, low))
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


def read_topic(settings: Settings, topic: str, serde: Serde,
               keep: Callable[[bytes | None], bool] | None = None,
               timeout_s: float = 120.0) -> Iterator[ev.Event]:
    """Every wanted event of `topic` from the beginning to its end at call time."""
    for _, event in read_positioned(settings, topic, serde, keep, timeout_s):
        yield event


def read_positioned(settings: Settings, topic: str, serde: Serde,
                    keep: Callable[[bytes | None], bool] | None = None,
                    timeout_s: float = 120.0) -> Iterator[tuple[tuple[int, int], ev.Event]]:
    """Like read_topic, with each event's (partition, offset)."""
    wanted = WANTED[topic]
    for msg in read_messages(settings, topic, timeout_s):
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


def rebuild(state: RouterState, settings: Settings, serde: Serde | None = None,
            replica: str | None = None, group_id: str = "fleetplane-router") -> dict[str, int]:
    """Fold the topics into `state`; returns how many events each topic contributed.

    With `replica` (shared statistics on): the statistics come from the shared state topic,
    and outcomes below the group's committed offsets (which the topic's cells already count)
    close their tasks without being counted again; only the ones after them are counted."""
    serde = serde or default_serde()
    started = time.monotonic()
    counts: dict[str, int] = {}
    committed: dict[tuple[str, int], int] | None = None
    if replica is not None:
        counts[STATS_TOPIC] = restore_shared(state, settings, replica)
        committed = committed_offsets(settings, group_id, [LIFECYCLE, OUTCOMES])
    for topic in (ROUTED, LIFECYCLE, OUTCOMES, BUDGET):
        n = 0
        for (partition, offset), event in read_positioned(settings, topic, serde):
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
        for event in read_topic(settings, ACCEPTED, serde, keep=lambda k: k in keys):
            state.apply(event)
            n += 1
    counts[ACCEPTED] = n
    log.info("router state rebuilt", seconds=round(time.monotonic() - started, 3),
             events=counts, open_tasks=len(state.tasks), stats=len(state.stats),
             replicas=sorted(state.stats.replicas()), cache_entries=len(state.cache))
    return counts
