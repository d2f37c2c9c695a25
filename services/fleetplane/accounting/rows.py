"""Pure mapping from a decoded event (and where it was read) to ClickHouse rows, per table.

Rows are tuples in the order of the table's ``*_COLUMNS`` (inserted with those column names);
the table definitions live in infra/clickhouse/.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from fleetplane.core import events as ev
from fleetplane.core.loop import Record
from fleetplane.core.states import STATE_RANK, TERMINAL_STATES

Row = tuple[Any, ...]

EVENTS = "events"
MODEL_CALLS = "model_calls"
TASK_TRANSITIONS = "task_transitions"
TOOL_CALLS = "tool_calls"
WORKSPACE_CHANGES = "workspace_changes"
ATTEMPT_OUTCOMES = "attempt_outcomes"
HOLDS = "holds"
ALERTS = "alerts"
UTILIZATION = "utilization"

EVENTS_COLUMNS: tuple[str, ...] = (
    "event_id", "event_type", "task_id", "team", "occurred_at", "schema_version", "causation_id",
    "topic", "partition", "offset", "payload", "avro",
)
MODEL_CALLS_COLUMNS: tuple[str, ...] = (
    "task_id", "team", "attempt", "call_index", "model", "provider", "tier", "input_tokens",
    "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd",
    "latency_ms", "outcome", "error", "stop_reason", "occurred_at", "event_id", "task_type",
    "first_call",
)
# model_calls.task_type is filled in by the sink (ClickHouseSink resolves it from the task's
# lifecycle rows); rows_for leaves it empty. first_call (1 on the task's first model call) is set
# by the sink too; rows_for leaves it 0.
MODEL_CALL_TASK_TYPE = MODEL_CALLS_COLUMNS.index("task_type")
MODEL_CALL_FIRST = MODEL_CALLS_COLUMNS.index("first_call")
TASK_TRANSITIONS_COLUMNS: tuple[str, ...] = (
    "task_id", "team", "event_id", "event_type", "state", "terminal", "state_rank", "occurred_at",
    "attempt", "task_type", "model", "tier", "cost_usd", "reason",
)
TOOL_CALLS_COLUMNS: tuple[str, ...] = (
    "task_id", "team", "attempt", "call_index", "tool", "outcome", "duration_ms", "occurred_at",
    "event_id",
)
WORKSPACE_CHANGES_COLUMNS: tuple[str, ...] = (
    "task_id", "team", "attempt", "repository", "branch", "commit", "files", "added", "removed",
    "occurred_at", "event_id",
)
ATTEMPT_OUTCOMES_COLUMNS: tuple[str, ...] = (
    "task_id", "team", "attempt", "event_type", "success", "final", "cached", "model",
    "failure_class", "cost_usd", "duration_ms", "audit_head", "audit_count", "occurred_at",
    "event_id", "task_type", "call_model", "tier",
)
# attempt_outcomes.task_type, call_model and tier (the model and tier of the attempt's last model
# call) are filled in by the sink; rows_for leaves them empty.
OUTCOME_TASK_TYPE = ATTEMPT_OUTCOMES_COLUMNS.index("task_type")
HOLDS_COLUMNS: tuple[str, ...] = (
    "task_id", "team", "attempt", "kind", "reason", "held_by", "occurred_at", "event_id",
)
ALERTS_COLUMNS: tuple[str, ...] = (
    "team", "task_id", "severity", "kind", "message", "metric", "value", "baseline",
    "occurred_at", "event_id",
)
UTILIZATION_COLUMNS: tuple[str, ...] = (
    "executor_id", "slot", "window_start", "window_s", "model_s", "tool_s", "busy_s", "idle_s",
    "attempts", "occurred_at", "event_id",
)

# Insert order of a flush: `events` last, so an event visible there has its other rows stored.
COLUMNS: dict[str, tuple[str, ...]] = {
    MODEL_CALLS: MODEL_CALLS_COLUMNS,
    TOOL_CALLS: TOOL_CALLS_COLUMNS,
    WORKSPACE_CHANGES: WORKSPACE_CHANGES_COLUMNS,
    ATTEMPT_OUTCOMES: ATTEMPT_OUTCOMES_COLUMNS,
    HOLDS: HOLDS_COLUMNS,
    ALERTS: ALERTS_COLUMNS,
    UTILIZATION: UTILIZATION_COLUMNS,
    TASK_TRANSITIONS: TASK_TRANSITIONS_COLUMNS,
    EVENTS: EVENTS_COLUMNS,
}

# Timeline order of event types that share a millisecond (a task's usual life story).
EVENT_ORDER: tuple[str, ...] = (
    "TaskSubmitted", "TaskRejected", "TaskAccepted", "TaskRouted", "TaskHeld", "TaskDispatched",
    "TaskStarted", "TaskHeartbeat", "ModelCall", "ToolCall", "WorkspaceChange", "TaskConflict",
    "TaskFailed", "TaskRetrying", "TaskEscalated", "ControlCommand", "TaskCompleted",
    "TaskAbandoned", "TaskCancelled", "TaskRolledBack", "BudgetStatus", "Alert",
    "ExecutorUtilization", "DeadLetter",
)

_STATE_OF: dict[type[ev.Event], str] = {
    ev.TaskSubmitted: "submitted",
    ev.TaskAccepted: "accepted",
    ev.TaskRejected: "rejected",
    ev.TaskRouted: "routed",
    ev.TaskHeld: "held",
    ev.TaskDispatched: "dispatched",
    ev.TaskStarted: "running",
    ev.TaskRetrying: "retrying",
    ev.TaskEscalated: "escalated",
    ev.TaskCompleted: "completed",
    ev.TaskAbandoned: "abandoned",
    ev.TaskCancelled: "cancelled",
    ev.TaskRolledBack: "rolled_back",
}


def state_of(event: ev.Event) -> str | None:
    """The task state an event moves its task into; None for events that are not transitions
    (heartbeats, model and tool calls, workspace changes, budget, alerts, control, dead letters).
    A non-final TaskFailed is ``attempt_failed`` (another attempt or decision follows)."""
    if isinstance(event, ev.TaskFailed):
        return "failed" if event.final else "attempt_failed"
    return _STATE_OF.get(type(event))


def payload_json(event: ev.Event) -> str:
    """The event as a JSON object string (bytes fields of dead letters as base64)."""
    if isinstance(event, ev.DeadLetter):
        data: dict[str, Any] = event.model_dump(mode="json",
                                                exclude={"key", "payload", "headers"})
        data["key"] = _b64(event.key) if event.key is not None else None
        data["payload"] = _b64(event.payload)
        data["headers"] = {k: _b64(v) for k, v in event.headers.items()}
        data["bytes_encoding"] = "base64"
        return json.dumps(data, separators=(",", ":"))
    return event.model_dump_json()


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def event_row(event: ev.Event, record: Record) -> Row:
    return (
        event.event_id, type(event).__name__, event.task_id, event.team, event.occurred_at,
        event.schema_version, event.causation_id or "", record.topic, record.partition,
        record.offset, payload_json(event), record.value,
    )


def model_call_row(event: ev.ModelCall) -> Row:
    return (
        event.task_id, event.team, event.attempt, event.call_index, event.model, event.provider,
        event.tier, event.input_tokens, event.output_tokens, event.cache_creation_input_tokens,
        event.cache_read_input_tokens, event.cost_usd, event.latency_ms, event.outcome,
        event.error or "", event.stop_reason or "", event.occurred_at, event.event_id, "", 0,
    )


#: event types that feed no fact table besides events/transitions/model calls (skip _fact_row)
_NO_FACT_ROW: frozenset[type[ev.Event]] = frozenset(
    cls for cls in ev.EVENT_TYPES.values() if cls not in (
        ev.ToolCall, ev.WorkspaceChange, ev.TaskCompleted, ev.TaskFailed, ev.TaskHeld, ev.Alert,
        ev.ExecutorUtilization))


def _fact_row(event: ev.Event) -> tuple[str, Row] | None:
    """The row of the one fact table an event feeds besides events/transitions, if any."""
    if isinstance(event, ev.ToolCall):
        return TOOL_CALLS, (event.task_id, event.team, event.attempt, event.call_index,
                            event.tool, event.outcome, event.duration_ms, event.occurred_at,
                            event.event_id)
    if isinstance(event, ev.WorkspaceChange):
        return WORKSPACE_CHANGES, (
            event.task_id, event.team, event.attempt, event.repository, event.branch,
            event.commit or "", [f.path for f in event.files],
            sum(f.added for f in event.files), sum(f.removed for f in event.files),
            event.occurred_at, event.event_id)
    if isinstance(event, ev.TaskCompleted):
        return ATTEMPT_OUTCOMES, (
            event.task_id, event.team, event.attempt, "TaskCompleted", 1, 1, int(event.cached),
            event.model, "", event.cost_usd, float(event.duration_ms), event.audit_head,
            event.audit_count, event.occurred_at, event.event_id, "", "", "")
    if isinstance(event, ev.TaskFailed):
        return ATTEMPT_OUTCOMES, (
            event.task_id, event.team, event.attempt, "TaskFailed", 0, int(event.final), 0, "",
            event.failure_class, event.cost_usd, 0.0, event.audit_head, event.audit_count,
            event.occurred_at, event.event_id, "", "", "")
    if isinstance(event, ev.TaskHeld):
        return HOLDS, (event.task_id, event.team, event.attempt, event.kind or "unspecified",
                       event.reason[:2000], event.held_by or "", event.occurred_at,
                       event.event_id)
    if isinstance(event, ev.Alert):
        return ALERTS, (event.team, event.task_id, event.severity, event.kind,
                        event.message[:4000], event.metric or "", event.value, event.baseline,
                        event.occurred_at, event.event_id)
    if isinstance(event, ev.ExecutorUtilization):
        return UTILIZATION, (event.executor_id, event.slot, event.window_start, event.window_s,
                             event.model_s, event.tool_s, event.busy_s, event.idle_s,
                             event.attempts, event.occurred_at, event.event_id)
    return None


def _details(event: ev.Event) -> tuple[str, str, str, float, str]:
    """(task_type, model, tier, reported cost, reason) where the event carries them."""
    task_type = model = tier = reason = ""
    cost = 0.0
    fields = type(event).model_fields   # not getattr(event, ...): a missing attribute is slow
    if "spec" in fields:
        spec: ev.TaskSpec | None = event.spec  # type: ignore[attr-defined]
        if spec is not None:
            task_type = spec.task_type
    if isinstance(event, ev.TaskRouted | ev.TaskDispatched):
        model, tier = event.model, event.tier
    elif isinstance(event, ev.TaskEscalated):
        tier = event.to_tier
    elif isinstance(event, ev.TaskCompleted):
        model, cost = event.model, event.cost_usd
    elif isinstance(event, ev.TaskFailed):
        cost = event.cost_usd
    if "reason" in fields:
        value = event.reason  # type: ignore[attr-defined]
        if isinstance(value, str):
            reason = value
    return task_type, model, tier, cost, reason


def transition_row(event: ev.Event) -> Row | None:
    state = state_of(event)
    if state is None:
        return None
    task_type, model, tier, cost, reason = _details(event)
    attempt = event.attempt if "attempt" in type(event).model_fields else 0  # type: ignore[attr-defined]
    return (
        event.task_id, event.team, event.event_id, type(event).__name__, state,
        int(state in TERMINAL_STATES), STATE_RANK[state], event.occurred_at,
        attempt if isinstance(attempt, int) else 0, task_type, model, tier, cost, reason[:2000],
    )


def rows_for(event: ev.Event, record: Record) -> dict[str, list[Row]]:
    """Every row one consumed event adds, by table (always one ``events`` row)."""
    out: dict[str, list[Row]] = {EVENTS: [event_row(event, record)]}
    cls = type(event)
    if cls is ev.ModelCall:
        out[MODEL_CALLS] = [model_call_row(event)]  # type: ignore[arg-type]
    elif cls not in _NO_FACT_ROW:
        fact = _fact_row(event)
        if fact is not None:
            out[fact[0]] = [fact[1]]
    if cls in _STATE_OF or cls is ev.TaskFailed:
        transition = transition_row(event)
        if transition is not None:
            out[TASK_TRANSITIONS] = [transition]
    return out


def as_dict(table: str, row: Row) -> dict[str, Any]:
    """A row with its column names (for tests and debugging)."""
    return dict(zip(COLUMNS[table], row, strict=True))

