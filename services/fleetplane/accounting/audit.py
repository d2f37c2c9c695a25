"""Audit: a task's timeline from the Kafka topics or from ClickHouse, and tamper evidence.

Both sources yield the same `Entry` list: the decoded event and where it was recorded (topic,
partition, offset). Entries are ordered like the ClickHouse timeline query (occurred_at, the
lifecycle order of event types within a millisecond, topic, partition, offset, event_id) and
deduplicated by event_id, so replaying the topics and reading ClickHouse give the same timeline.

`verify_task` checks each attempt's hash chain (core.auditchain) over its ModelCall, ToolCall and
WorkspaceChange events against the attempt outcome's audit_head / audit_count. Audit events are
taken in recorded order: by occurred_at, ties resolved along the chain; and within one topic
partition the offsets must grow along that order, so a record moved on a topic is caught too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from fleetplane.accounting.rows import EVENT_ORDER
from fleetplane.core import events as ev
from fleetplane.core.auditchain import AuditEvent, event_hash, verify
from fleetplane.core.errors import NotRetriable
from fleetplane.core.serde import Serde, default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import event_topics, load_topics

AUDIT_TYPES = (ev.ModelCall, ev.ToolCall, ev.WorkspaceChange)
_ORDER = {name: i + 1 for i, name in enumerate(EVENT_ORDER)}


@dataclass(frozen=True)
class Entry:
    event: ev.Event
    topic: str = ""
    partition: int = 0
    offset: int = 0

    def sort_key(self) -> tuple[Any, ...]:
        e = self.event
        return (e.occurred_at, _ORDER.get(type(e).__name__, 0), self.topic, self.partition,
                self.offset, e.event_id)


def ordered(entries: Iterable[Entry]) -> list[Entry]:
    """Timeline order, each event once (the first recorded copy)."""
    seen: dict[str, Entry] = {}
    for entry in sorted(entries, key=lambda x: (x.topic, x.partition, x.offset)):
        seen.setdefault(entry.event.event_id, entry)
    return sorted(seen.values(), key=Entry.sort_key)


def entries_from_rows(rows: Sequence[dict[str, Any]]) -> list[Entry]:
    """Entries from ClickHouse `events` rows (or the API's /v1/tasks/{id}/events)."""
    out = []
    for row in rows:
        cls = ev.EVENT_TYPES.get(row["event_type"])
        if cls is None or cls is ev.DeadLetter:
            continue
        payload = row["payload"]
        data = json.loads(payload) if isinstance(payload, str) else payload
        out.append(Entry(cls.model_validate(data), row["topic"], int(row["partition"]),
                         int(row["offset"])))
    return ordered(out)


def replay_kafka(settings: Settings, task_id: str, *, serde: Serde | None = None,
                 timeout_s: float = 60.0) -> list[Entry]:
    """Read every event topic from the beginning to its current end (a consumer of its own,
    no group offsets committed) and keep the events of `task_id`."""
    serde = serde or default_serde()
    topics = event_topics(load_topics(settings.topics_file))
    consumer = Consumer({**settings.client_config(), "group.id": f"fleetplane-audit-{task_id}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "isolation.level": "read_committed", "enable.partition.eof": True})
    try:
        metadata = consumer.list_topics(timeout=10)
        ends: set[tuple[str, int]] = set()
        assignment = []
        for topic in topics:
            if topic not in metadata.topics:
                continue
            for p in metadata.topics[topic].partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high > low:
                    ends.add((topic, p))
                    assignment.append(TopicPartition(topic, p, OFFSET_BEGINNING))
        out: list[Entry] = []
        if not assignment:
            return out
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout_s
        # A partition is done at its end-of-partition event: the broker's end, which for
        # transactional producers lies past the last data record (commit markers).
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                tp = (msg.topic() or "", msg.partition() or 0)
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        ends.discard(tp)
                    continue
                try:
                    event = serde.decode(msg.value() or b"")
                except NotRetriable:
                    continue
                if event.task_id == task_id:
                    out.append(Entry(event, tp[0], tp[1], msg.offset() or 0))
        if ends:
            raise TimeoutError(f"replay did not reach the end of {sorted(ends)} in {timeout_s}s")
        return ordered(out)
    finally:
        consumer.close()


def timeline(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """The readable timeline: one dict per event with what an auditor looks at."""
    out = []
    for entry in entries:
        e = entry.event
        item: dict[str, Any] = {"occurred_at": e.occurred_at.isoformat(),
                                "event_type": type(e).__name__, "event_id": e.event_id,
                                "attempt": getattr(e, "attempt", None), "detail": _detail(e)}
        out.append(item)
    return out


def _detail(e: ev.Event) -> str:
    if isinstance(e, ev.TaskSubmitted | ev.TaskAccepted):
        return f"{e.spec.task_type} via {e.source}"
    if isinstance(e, ev.TaskRouted):
        return f"{e.model} ({e.tier}): {e.reason}"
    if isinstance(e, ev.TaskDispatched):
        return f"{e.action} on {e.model}"
    if isinstance(e, ev.TaskHeld):
        return f"{e.kind or 'held'}: {e.reason}"
    if isinstance(e, ev.TaskStarted):
        return f"executor {e.executor_id} slot {e.slot}"
    if isinstance(e, ev.ModelCall):
        return (f"#{e.call_index} {e.model} in={e.input_tokens} out={e.output_tokens} "
                f"${e.cost_usd:.6f} {e.outcome}")
    if isinstance(e, ev.ToolCall):
        return f"#{e.call_index} {e.tool} {e.outcome}"
    if isinstance(e, ev.WorkspaceChange):
        return f"{e.repository}@{e.branch} {len(e.files)} files"
    if isinstance(e, ev.TaskCompleted):
        return f"{e.model} ${e.cost_usd:.6f}" + (" (cached)" if e.cached else "")
    if isinstance(e, ev.TaskFailed):
        return f"{e.failure_class}: {e.reason}" + (" (final)" if e.final else "")
    reason = getattr(e, "reason", None)
    return str(reason) if reason else ""


# -- tamper evidence ---------------------------------------------------------------------------
@dataclass
class AttemptVerdict:
    attempt: int
    ok: bool
    events: int
    recorded_count: int | None
    problems: list[str] = field(default_factory=list)


def chain_order(entries: Sequence[Entry]) -> list[Entry]:
    """Audit entries in recorded order: occurred_at, and within one millisecond the entry whose
    prev_hash is the running head first (then topic/partition/offset)."""
    remaining = sorted(entries, key=lambda x: (x.event.occurred_at, x.topic, x.partition,
                                               x.offset))
    out: list[Entry] = []
    head = ""
    while remaining:
        t0 = remaining[0].event.occurred_at
        tied = [x for x in remaining if x.event.occurred_at == t0]
        pick = next((x for x in tied if getattr(x.event, "prev_hash", "") == head), tied[0])
        remaining.remove(pick)
        out.append(pick)
        head = event_hash(pick.event)
    return out


def offset_problems(entries: Sequence[Entry]) -> list[str]:
    last: dict[tuple[str, int], int] = {}
    problems = []
    for x in entries:
        if not x.topic:
            continue
        tp = (x.topic, x.partition)
        if tp in last and x.offset < last[tp]:
            problems.append(f"{type(x.event).__name__} {x.event.event_id} is recorded at "
                            f"{x.topic}[{x.partition}]@{x.offset}, before the event that "
                            f"precedes it (@{last[tp]}): reordered")
        last[tp] = x.offset
    return problems


def verify_task(entries: Sequence[Entry]) -> dict[str, Any]:
    """Verify every attempt's chain; ok only when every attempt with audit events verifies."""
    audit: dict[int, list[Entry]] = {}
    outcomes: dict[int, ev.TaskCompleted | ev.TaskFailed] = {}
    for x in entries:
        e = x.event
        if isinstance(e, AUDIT_TYPES):
            audit.setdefault(e.attempt, []).append(x)
        elif isinstance(e, ev.TaskCompleted | ev.TaskFailed) and (
                e.audit_head or e.audit_count or e.attempt not in outcomes):
            outcomes[e.attempt] = e
    verdicts = []
    for attempt in sorted(set(audit) | set(outcomes)):
        items = chain_order(audit.get(attempt, []))
        events: list[AuditEvent] = [x.event for x in items]  # type: ignore[misc]
        outcome = outcomes.get(attempt)
        if outcome is None:
            # attempt still running: the links so far must hold
            v = verify(events, event_hash(events[-1]) if events else "", len(events))
            verdict = AttemptVerdict(attempt, v.ok, len(events), None,
                                     [*v.problems, "no outcome yet: chain checked up to now"]
                                     if not v.ok else [])
        elif not outcome.audit_head and not outcome.audit_count and not any(
                getattr(e, "prev_hash", "") for e in events):
            verdict = AttemptVerdict(attempt, not events, len(events), 0,
                                     [] if not events else
                                     [f"{len(events)} audit events but the outcome carries no "
                                      "audit_head (unchained executor?)"])
        else:
            v = verify(events, outcome.audit_head, outcome.audit_count)
            verdict = AttemptVerdict(attempt, v.ok, len(events), outcome.audit_count,
                                     list(v.problems))
        extra = offset_problems(items)
        if extra:
            verdict.ok = False
            verdict.problems.extend(extra)
        verdicts.append(verdict)
    return {"ok": all(v.ok for v in verdicts), "attempts": [v.__dict__ for v in verdicts]}
