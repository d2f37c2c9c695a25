"""Pure parts of accounting: event -> rows, task states, DDL rendering (no broker or ClickHouse)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from fleetplane.accounting import rows
from fleetplane.accounting.schema import ddl_statements, render, split_statements, ttl_clause
from fleetplane.core import events as ev
from fleetplane.core.loop import Record
from fleetplane.core.states import TERMINAL_STATES

SPEC = ev.TaskSpec(name="n", task_type="review", prompt="p")
T = "t-1"
REC = Record(topic="tasks.lifecycle", partition=3, offset=41, key=b"t-1", value=b"")


def mk(cls: type[ev.Event], **fields: Any) -> ev.Event:
    return cls(task_id=T, team="a", **fields)


def samples() -> list[ev.Event]:
    return [
        mk(ev.TaskSubmitted, spec=SPEC),
        mk(ev.TaskAccepted, spec=SPEC),
        mk(ev.TaskRejected, reason="no prompt", field="spec.prompt"),
        mk(ev.TaskRouted, spec=SPEC, attempt=1, model="m", provider="p", tier="small",
           reason="cheap"),
        mk(ev.TaskDispatched, spec=SPEC, attempt=1, model="m", provider="p", tier="small"),
        mk(ev.TaskHeld, reason="scope busy"),
        mk(ev.TaskStarted, attempt=1, executor_id="e"),
        mk(ev.TaskHeartbeat, attempt=1, executor_id="e"),
        mk(ev.TaskCompleted, attempt=1, model="m", output="o", cost_usd=0.5, duration_ms=1),
        mk(ev.TaskFailed, attempt=1, failure_class="x", reason="boom", final=False),
        mk(ev.TaskFailed, attempt=2, failure_class="x", reason="boom", final=True,
           cost_usd=0.25),
        mk(ev.TaskRetrying, attempt=1, delay_ms=10, reason="429"),
        mk(ev.TaskEscalated, attempt=1, from_tier="small", to_tier="frontier", reason="r"),
        mk(ev.TaskAbandoned, attempt=3, reason="gave up"),
        mk(ev.TaskCancelled, reason="user"),
        mk(ev.TaskRolledBack, attempt=1, reason="tests broke"),
        mk(ev.ModelCall, attempt=1, call_index=0, model="m", provider="p", tier="small",
           input_tokens=10, output_tokens=2, cost_usd=0.01, latency_ms=5,
           outcome="ok"),
        mk(ev.ToolCall, attempt=1, call_index=0, tool="read", arguments="{}", outcome="ok"),
        mk(ev.WorkspaceChange, attempt=1, repository="r", branch="b",
           files=[ev.FileChange(path="a.py", added=1, removed=0)]),
        mk(ev.BudgetStatus, period="2026-11", budget_usd=10, spent_usd=1, remaining_usd=9,
           state="ok"),
        mk(ev.Alert, severity="warn", kind="spend", message="m"),
        mk(ev.ControlCommand, command="cancel"),
        mk(ev.DeadLetter, service="ingest", source_topic="s", source_partition=0,
           source_offset=1, payload=b"\xff", error_class="E", reason="r"),
        mk(ev.TaskConflict, attempt=1, repository="r", paths=["a.py"], reason="outside scope"),
        mk(ev.ExecutorUtilization, executor_id="x", slot=0, window_start=datetime.now(UTC),
           window_s=10, busy_s=6, model_s=4, tool_s=1, idle_s=4),
    ]


def test_every_event_type_has_a_sample_and_a_timeline_rank() -> None:
    assert {type(e).__name__ for e in samples()} == set(ev.EVENT_TYPES)
    assert set(rows.EVENT_ORDER) == set(ev.EVENT_TYPES)


@pytest.mark.parametrize("event", samples(), ids=lambda e: type(e).__name__)
def test_rows_match_their_columns_and_agree_with_core_terminality(event: ev.Event) -> None:
    out = rows.rows_for(event, REC)
    for table, batch in out.items():
        for row in batch:
            assert len(row) == len(rows.COLUMNS[table])
    [e_row] = out[rows.EVENTS]
    as_event = rows.as_dict(rows.EVENTS, e_row)
    assert as_event["event_id"] == event.event_id
    assert as_event["event_type"] == type(event).__name__
    assert (as_event["topic"], as_event["partition"], as_event["offset"]) == (
        "tasks.lifecycle", 3, 41)
    assert json.loads(as_event["payload"])["event_id"] == event.event_id
    assert (rows.MODEL_CALLS in out) == isinstance(event, ev.ModelCall)
    assert (rows.TOOL_CALLS in out) == isinstance(event, ev.ToolCall)
    assert (rows.HOLDS in out) == isinstance(event, ev.TaskHeld)
    assert (rows.ATTEMPT_OUTCOMES in out) == isinstance(event, ev.TaskCompleted | ev.TaskFailed)
    assert (rows.UTILIZATION in out) == isinstance(event, ev.ExecutorUtilization)
    assert (rows.ALERTS in out) == isinstance(event, ev.Alert)
    assert (rows.WORKSPACE_CHANGES in out) == isinstance(event, ev.WorkspaceChange)
    state = rows.state_of(event)
    assert (rows.TASK_TRANSITIONS in out) == (state is not None)
    if state is not None and not isinstance(event, ev.TaskRejected):
        # rejected ends a task that was never accepted; core counts only accepted tasks
        assert (state in TERMINAL_STATES) == ev.is_terminal(event)


def test_transition_rows_carry_type_model_tier_cost_and_reason() -> None:
    by_type = {type(e).__name__ + str(getattr(e, "final", "")): e for e in samples()}
    routed = rows.as_dict(rows.TASK_TRANSITIONS,
                          rows.transition_row(by_type["TaskRouted"]) or ())
    assert (routed["state"], routed["task_type"], routed["model"], routed["tier"]) == (
        "routed", "review", "m", "small")
    failed = rows.as_dict(rows.TASK_TRANSITIONS,
                          rows.transition_row(by_type["TaskFailedTrue"]) or ())
    assert (failed["state"], failed["terminal"], failed["cost_usd"], failed["attempt"]) == (
        "failed", 1, 0.25, 2)
    assert failed["reason"] == "boom"
    retry = rows.transition_row(by_type["TaskFailedFalse"]) or ()
    assert rows.as_dict(rows.TASK_TRANSITIONS, retry)["state"] == "attempt_failed"
    escalated = rows.as_dict(rows.TASK_TRANSITIONS,
                             rows.transition_row(by_type["TaskEscalated"]) or ())
    assert escalated["tier"] == "frontier"
    assert rows.transition_row(by_type["TaskHeartbeat"]) is None


def test_model_call_row() -> None:
    call = ev.ModelCall(task_id=T, team="a", attempt=2, call_index=4, model="m", provider="p",
                        tier="t", input_tokens=10, output_tokens=2, cache_creation_input_tokens=3,
                        cache_read_input_tokens=4, cost_usd=0.01, latency_ms=5.5,
                        outcome="error", error="overloaded",
                        occurred_at=datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC))
    row = rows.as_dict(rows.MODEL_CALLS, rows.model_call_row(call))
    assert row["cache_creation_input_tokens"] == 3
    assert row["error"] == "overloaded"
    assert row["stop_reason"] == ""
    assert row["occurred_at"] == call.occurred_at


def test_dead_letter_payload_is_json_with_base64_bytes() -> None:
    dead = ev.DeadLetter(task_id=T, team="a", service="s", source_topic="x", source_partition=0,
                         source_offset=1, key=b"\x00k", payload=b"\xff\xfe",
                         headers={"h": b"\x80"}, error_class="E", reason="r")
    data = json.loads(rows.payload_json(dead))
    assert base64.b64decode(data["payload"]) == b"\xff\xfe"
    assert base64.b64decode(data["key"]) == b"\x00k"
    assert base64.b64decode(data["headers"]["h"]) == b"\x80"
    assert data["reason"] == "r"


def test_ddl_renders_every_statement_with_database_and_ttl() -> None:
    statements = ddl_statements("acct", ttl_days=30)
    assert len(statements) == 42   # the rollups' views are created by rollups.create_views
    assert statements[0] == "CREATE DATABASE IF NOT EXISTS acct"
    assert not any("{" in s or s.rstrip().endswith(";") for s in statements)
    fact_tables = [s for s in statements if "ReplacingMergeTree\n" in s]
    assert len(fact_tables) == 9
    # the audit log (events) keeps its rows unless clickhouse_audit_ttl_days says otherwise
    assert sum("TTL toDateTime(occurred_at) + INTERVAL 30 DAY" in s for s in fact_tables) == 8
    assert all("PARTITION BY toYYYYMM(occurred_at)" in s for s in fact_tables)
    daily = ddl_statements("acct", partition="day")
    assert sum("PARTITION BY toYYYYMMDD(occurred_at)" in s for s in daily
               if "ReplacingMergeTree\n" in s) == 9
    with pytest.raises(ValueError, match="partition"):
        ddl_statements("acct", partition="hour")
    # raw rows kept forever with ttl_days=0; the rollups never expire; only the dashboard's
    # per-minute live tables (recent_*) have their own fixed TTL
    assert all("TTL" not in s for s in ddl_statements("acct", ttl_days=0)
               if ("ReplacingMergeTree" in s or "AggregatingMergeTree" in s)
               and "acct.recent_" not in s)
    assert sum("acct.recent_" in s and "TTL minute + INTERVAL" in s
               for s in ddl_statements("acct", ttl_days=0)) == 2
    assert ttl_clause(-1) == ""


def test_ddl_rejects_database_names_that_are_not_identifiers() -> None:
    with pytest.raises(ValueError, match="identifier"):
        render("CREATE DATABASE {database}", "x; DROP TABLE y")


def test_split_statements_ignores_comment_lines() -> None:
    sql = "-- a comment; with a semicolon\nSELECT 1;\n-- another\nSELECT\n  2;\nSELECT 3"
    assert split_statements(sql) == ["SELECT 1", "SELECT\n  2", "SELECT 3"]
