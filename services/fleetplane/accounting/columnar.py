"""The sink's fast path: a consumed batch of raw records straight to rows, without event objects.

The loop's usual path builds a `Record` and a validated pydantic event per record and maps the
event to rows (rows.rows_for). Accounting only stores what it reads, so here each record's Avro
body is decoded into the field dict the schema gives (serde.decode_record: cavro for records of
the current schema, fastavro's schema resolution for older writers) and the rows are built from
that dict: the same tuples rows_for builds (tests/integration/test_accounting_columnar.py
compares them for every event type), including
the `payload` JSON (orjson with `Z` times writes what pydantic's model_dump_json writes).

What does not take this path (`BatchRows.slow`, handled one by one by the usual handler, which
dead-letters what it cannot store):
* dead letters themselves (bytes fields: payload_json's base64 form), and event types rows.py
  does not know;
* records that do not decode (the usual path turns them into DeadLetter records);
* every record of a batch whose numeric columns hold a value no column can take (a bulk check
  over columns, rowcheck's ranges; the rare bad batch is redone record by record, so the bad
  record is dead-lettered with its column named and the others are stored).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message

from fleetplane.accounting.rowcheck import _CHECKS, _UINT
from fleetplane.accounting.rows import (
    _STATE_OF,
    ALERTS,
    ATTEMPT_OUTCOMES,
    COLUMNS,
    EVENTS,
    HOLDS,
    MODEL_CALLS,
    TASK_TRANSITIONS,
    TOOL_CALLS,
    UTILIZATION,
    WORKSPACE_CHANGES,
    Row,
)
from fleetplane.core.errors import Fatal
from fleetplane.core.logging import get_logger
from fleetplane.core.serde import Serde
from fleetplane.core.states import STATE_RANK, TERMINAL_STATES

log = get_logger(__name__)

Fields = dict[str, Any]
_ORJSON = orjson.OPT_UTC_Z
_STATE: dict[str, str] = {cls.__name__: state for cls, state in _STATE_OF.items()}


def payload(d: Fields) -> str:
    """The event's JSON as `rows.payload_json` writes it (not for dead letters)."""
    return orjson.dumps(d, option=_ORJSON).decode()


def _model_call(d: Fields) -> tuple[str, Row]:
    return MODEL_CALLS, (
        d["task_id"], d["team"], d["attempt"], d["call_index"], d["model"], d["provider"],
        d["tier"], d["input_tokens"], d["output_tokens"], d["cache_creation_input_tokens"],
        d["cache_read_input_tokens"], d["cost_usd"], d["latency_ms"], d["outcome"],
        d["error"] or "", d["stop_reason"] or "", d["occurred_at"], d["event_id"], "", 0)


def _tool_call(d: Fields) -> tuple[str, Row]:
    return TOOL_CALLS, (d["task_id"], d["team"], d["attempt"], d["call_index"], d["tool"],
                        d["outcome"], d["duration_ms"], d["occurred_at"], d["event_id"])


def _workspace_change(d: Fields) -> tuple[str, Row]:
    files = d["files"]
    return WORKSPACE_CHANGES, (
        d["task_id"], d["team"], d["attempt"], d["repository"], d["branch"], d["commit"] or "",
        [f["path"] for f in files], sum(f["added"] for f in files),
        sum(f["removed"] for f in files), d["occurred_at"], d["event_id"])


def _completed(d: Fields) -> tuple[str, Row]:
    return ATTEMPT_OUTCOMES, (
        d["task_id"], d["team"], d["attempt"], "TaskCompleted", 1, 1, int(d["cached"]),
        d["model"], "", d["cost_usd"], float(d["duration_ms"]), d["audit_head"],
        d["audit_count"], d["occurred_at"], d["event_id"], "", "", "")


def _failed(d: Fields) -> tuple[str, Row]:
    return ATTEMPT_OUTCOMES, (
        d["task_id"], d["team"], d["attempt"], "TaskFailed", 0, int(d["final"]), 0, "",
        d["failure_class"], d["cost_usd"], 0.0, d["audit_head"], d["audit_count"],
        d["occurred_at"], d["event_id"], "", "", "")


def _held(d: Fields) -> tuple[str, Row]:
    return HOLDS, (d["task_id"], d["team"], d["attempt"], d["kind"] or "unspecified",
                   d["reason"][:2000], d["held_by"] or "", d["occurred_at"], d["event_id"])


def _alert(d: Fields) -> tuple[str, Row]:
    return ALERTS, (d["team"], d["task_id"], d["severity"], d["kind"], d["message"][:4000],
                    d["metric"] or "", d["value"], d["baseline"], d["occurred_at"],
                    d["event_id"])


def _utilization(d: Fields) -> tuple[str, Row]:
    return UTILIZATION, (d["executor_id"], d["slot"], d["window_start"], d["window_s"],
                         d["model_s"], d["tool_s"], d["busy_s"], d["idle_s"], d["attempts"],
                         d["occurred_at"], d["event_id"])


#: event type -> the one fact row it adds besides events / task_transitions (rows._fact_row)
FACT: dict[str, Callable[[Fields], tuple[str, Row]]] = {
    "ModelCall": _model_call, "ToolCall": _tool_call, "WorkspaceChange": _workspace_change,
    "TaskCompleted": _completed, "TaskFailed": _failed, "TaskHeld": _held, "Alert": _alert,
    "ExecutorUtilization": _utilization,
}
#: event types taken by the fast path (DeadLetter carries bytes: the usual path)
FAST: frozenset[str] = frozenset(_STATE) | frozenset(FACT) | frozenset(
    ("TaskHeartbeat", "TaskConflict", "BudgetStatus", "ControlCommand"))


def _transition(name: str, d: Fields) -> Row | None:
    """rows.transition_row from the field dict."""
    if name == "TaskFailed":
        state = "failed" if d["final"] else "attempt_failed"
    else:
        found = _STATE.get(name)
        if found is None:
            return None
        state = found
    spec = d.get("spec")
    task_type = spec["task_type"] if spec is not None else ""
    model = tier = ""
    cost = 0.0
    if name in ("TaskRouted", "TaskDispatched"):
        model, tier = d["model"], d["tier"]
    elif name == "TaskEscalated":
        tier = d["to_tier"]
    elif name == "TaskCompleted":
        model, cost = d["model"], d["cost_usd"]
    elif name == "TaskFailed":
        cost = d["cost_usd"]
    reason = d.get("reason")
    attempt = d.get("attempt", 0)
    return (d["task_id"], d["team"], d["event_id"], name, state, int(state in TERMINAL_STATES),
            STATE_RANK[state], d["occurred_at"], attempt if isinstance(attempt, int) else 0,
            task_type, model, tier, cost, reason[:2000] if isinstance(reason, str) else "")


def rows_of(name: str, d: Fields, topic: str, partition: int, offset: int, value: bytes
            ) -> tuple[Row, tuple[str, Row] | None, Row | None]:
    """One record's rows: (events row, (table, fact row) or None, task_transitions row or
    None), as rows.rows_for gives them for the event."""
    fact = FACT.get(name)
    return ((d["event_id"], name, d["task_id"], d["team"], d["occurred_at"], d["schema_version"],
             d["causation_id"] or "", topic, partition, offset, payload(d), value),
            fact(d) if fact is not None else None, _transition(name, d))


@dataclass
class BatchRows:
    """The rows of a consumed batch by table, and what the fast path left to the handler."""

    rows: dict[str, list[Row]] = field(default_factory=lambda: {t: [] for t in COLUMNS})
    #: (topic, partition) -> (lowest, highest) offset of the records whose rows are here
    offsets: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    #: records for the usual path (decode errors, dead letters, an unstorable batch)
    slow: list[Message] = field(default_factory=list)
    #: (event type, fields) of each record taken, when kept (hooks need them: the fleet
    #: metrics' observe_batch takes this list as it is)
    events: list[tuple[str, Fields]] = field(default_factory=list)
    #: the message of each of `events`, at the same index (when kept)
    messages: list[Message] = field(default_factory=list)
    #: records read per topic (the loop's consumed-records metric)
    per_topic: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.rows.values())


def messages_of(msgs: Sequence[Message]) -> list[Message]:
    """The records of a consumed batch (core.loop.records_of without building Records):
    end-of-partition events and retriable consumer errors are skipped, a fatal one raises."""
    out: list[Message] = []
    for msg in msgs:
        err = msg.error()
        if err is None:
            out.append(msg)
        elif err.code() == KafkaError._PARTITION_EOF:
            continue
        elif err.fatal():
            raise Fatal(f"consumer error: {err}")
        else:
            log.warning("consumer error", error=str(err))
    return out


def build(msgs: Sequence[Message], serde: Serde, *, keep_events: bool = False) -> BatchRows:
    """Rows of every record the fast path takes (see the module doc)."""
    batch = BatchRows()
    rows = batch.rows
    ev_rows, tt_rows = rows[EVENTS], rows[TASK_TRANSITIONS]
    offsets = batch.offsets
    per_topic = batch.per_topic
    decode = serde.decode_record
    for msg in msgs:
        # (a record without an error always has them; `or` as core.loop's _record does)
        topic, partition = msg.topic() or "", msg.partition() or 0
        offset, value = msg.offset() or 0, msg.value() or b""
        per_topic[topic] = per_topic.get(topic, 0) + 1
        try:
            name, d = decode(value)
            if name not in FAST:
                batch.slow.append(msg)
                continue
            event_row, fact_row, transition = rows_of(name, d, topic, partition, offset, value)
        except Exception:   # undecodable, or a shape rows.py would refuse: the usual path
            batch.slow.append(msg)
            continue
        ev_rows.append(event_row)
        if fact_row is not None:
            rows[fact_row[0]].append(fact_row[1])
        if transition is not None:
            tt_rows.append(transition)
        key = (topic, partition)
        seen = offsets.get(key)
        offsets[key] = (offset, offset) if seen is None else (min(seen[0], offset),
                                                              max(seen[1], offset))
        if keep_events:
            batch.events.append((name, d))
            batch.messages.append(msg)
    if not storable(rows):
        # a value no column can hold somewhere in the batch: record by record (rowcheck)
        log.warning("a batch holds an unstorable value; handled record by record",
                    records=len(msgs))
        return BatchRows(slow=list(msgs), per_topic=per_topic)
    return batch


_NONE = type(None)


def _column_fine(kind: str, values: list[Any]) -> bool:
    limit = _UINT.get(kind)
    if limit is not None:
        if not set(map(type, values)) <= {int, bool}:
            return False
        return bool(min(values) >= 0 and max(values) < limit)
    kinds = set(map(type, values))
    if _NONE in kinds:
        kinds.discard(_NONE)
        values = [v for v in values if v is not None]
        if not values:
            return True
    if not kinds <= {int, float, bool} or not all(map(math.isfinite, values)):
        return False
    return kind != "cost" or min(values) >= 0


def storable(rows: dict[str, list[Row]]) -> bool:
    """Every numeric value of every row fits its column (rowcheck.check, by column)."""
    for table, batch in rows.items():
        if not batch:
            continue
        for i, _column, kind in _CHECKS[table]:
            if not _column_fine(kind, [row[i] for row in batch]):
                return False
    return True
