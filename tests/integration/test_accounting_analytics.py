"""Analytics, what-if, budgets, analyst SQL and audit verification over a real ClickHouse engine,
fed through the sink with a known fleet history (tests/integration/fleet_history.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleetplane.accounting.api import create_app
from fleetplane.accounting.rows import rows_for
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.accounting.store import Store
from fleetplane.accounting.whatif import wilson
from fleetplane.core import events as ev
from fleetplane.core.catalog import catalog_for
from fleetplane.core.loop import Record
from fleetplane.core.settings import Settings
from fleetplane.core.topics import topic_for
from tests.integration.fleet_history import base_time, stories, utilization_events
from tests.integration.test_accounting import close_test_store, open_test_store

P = "an"
ALPHA, BETA = f"{P}-alpha", f"{P}-beta"


def store_events(store: Store, events: list[ev.Event], start_offset: int = 0) -> None:
    sink = ClickHouseSink(store)
    for i, event in enumerate(events):
        sink.add(rows_for(event, Record(topic_for(event), 0, start_offset + i, None,
                                        b"avro-bytes")))
    sink.flush()


@pytest.fixture(scope="module")
def ch_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = open_test_store(tmp_path_factory.mktemp("accounting-analytics-ch"))
    history = [e for s in stories(P) for e in s.events()] + utilization_events(base_time()) \
        + second_executor(base_time())
    store_events(store, history)
    # a redelivered model call must not count twice (except in the daily rollups, see docs)
    store_events(store, [e for e in history if isinstance(e, ev.ModelCall)][:1], 0)
    yield store
    close_test_store(store)


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(sql_max_result_rows=50, sql_max_execution_time_s=5)


@pytest.fixture(scope="module")
def client(ch_store: Store, settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(ch_store, settings=settings)) as c:
        yield c


def get(client: TestClient, path: str, **params: Any) -> Any:
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_model_calls_carry_the_task_type_resolved_by_the_sink(client: TestClient) -> None:
    body = client.post("/v1/sql", json={"query": (
        "SELECT task_type, count() AS n FROM model_calls FINAL WHERE team LIKE 'an-%' "
        "GROUP BY task_type ORDER BY task_type")}).json()
    assert body["rows"] == [["codegen", 2], ["debug", 3], ["summarize", 2]]


def test_cost_per_day_from_the_rollups(client: TestClient) -> None:
    rows = get(client, "/v1/cost/daily", by="team")
    days = {r["day"] for r in rows if r["team"] in (ALPHA, BETA)}
    assert len(days) == 1
    by_team = {r["team"]: r for r in rows}
    # the redelivered copy of t1's first call (0.01) is not summed again by the rollup
    assert by_team[ALPHA]["cost_usd"] == pytest.approx(0.12)
    assert by_team[BETA]["cost_usd"] == pytest.approx(1.002)
    types = {r["task_type"]: r["cost_usd"] for r in get(client, "/v1/cost/daily", by="task_type",
                                                         team=BETA)}
    assert types == {"debug": pytest.approx(1.002)}
    exact = {r["team"]: r["cost_usd"] for r in get(client, "/v1/cost", by="team")}
    assert exact[ALPHA] == pytest.approx(0.12)   # model_calls FINAL: the duplicate is gone


def test_cost_to_value_by_task_type_and_team(client: TestClient) -> None:
    rows = get(client, "/v1/value", by="task_type")
    by_type = {r["task_type"]: r for r in rows}
    assert [r["task_type"] for r in rows][:1] == ["debug"]      # costliest per success first
    assert by_type["debug"]["successes"] == 2
    assert by_type["debug"]["tasks"] == 3
    assert by_type["debug"]["cost_per_success_usd"] == pytest.approx(1.002 / 2)
    assert by_type["summarize"]["successes"] == 2                # t1 and the cached t4
    assert by_type["summarize"]["cost_usd"] == pytest.approx(0.02)
    assert by_type["codegen"]["successes_per_usd"] == pytest.approx(10.0)
    teams = {r["team"]: r for r in get(client, "/v1/value", by="team")}
    assert teams[ALPHA]["successes_per_usd"] == pytest.approx(3 / 0.12)
    assert teams[BETA]["successes_per_usd"] == pytest.approx(2 / 1.002)


def test_cache_savings_valued_at_the_routed_models_cost(client: TestClient) -> None:
    body = get(client, "/v1/cache-savings", team=ALPHA)
    assert body["cached_tasks"] == 1
    # valued at the cost per success of summarize on haiku (issue 18: from the rollups): t1
    # succeeded for 0.01, t2 failed for 0.01, so a success there costs 0.02
    assert body["saved_usd"] == pytest.approx(0.02)
    assert body["by_task_type"][0]["task_type"] == "summarize"


def second_executor(t0: datetime) -> list[ev.Event]:
    """Another executor process with two slots: one busy the whole first window (all model
    time), one idle."""
    return [ev.ExecutorUtilization(task_id="", team="", executor_id="exec-2", slot=slot,
                                   window_start=t0, window_s=10.0, busy_s=busy,
                                   idle_s=10.0 - busy, model_s=busy, tool_s=0.0,
                                   attempts=1 if busy else 0,
                                   occurred_at=t0 + timedelta(seconds=10))
            for slot, busy in ((0, 10.0), (1, 0.0))]


def test_utilization_busy_idle_and_shares_per_executor_and_fleet(client: TestClient) -> None:
    body = get(client, "/v1/utilization", bucket_s=3600)
    total = body["total"]
    assert total["slots"] == 3
    assert total["busy_s"] == pytest.approx(18.0)
    assert total["idle_s"] == pytest.approx(22.0)
    assert total["busy_share"] == pytest.approx(18 / 40)
    assert total["model_share_of_busy"] == pytest.approx(15 / 18)
    assert total["tool_share_of_busy"] == pytest.approx(1.5 / 18)
    assert total["other_share_of_busy"] == pytest.approx(1.5 / 18)
    per = {r["executor_id"]: r for r in body["executors"]}
    assert sorted(per) == ["exec-1", "exec-2"]
    assert (per["exec-1"]["slots"], per["exec-2"]["slots"]) == (1, 2)
    assert per["exec-1"]["busy_share"] == pytest.approx(0.4)
    assert per["exec-2"]["busy_share"] == pytest.approx(0.5)
    assert per["exec-2"]["model_share_of_busy"] == pytest.approx(1.0)
    fine = get(client, "/v1/utilization", bucket_s=10)["series"]
    assert [r["busy_s"] for r in fine] == [16.0, 2.0]


def test_queue_wait_percentiles_and_held_time(client: TestClient) -> None:
    waits = {r["group"]: r for r in get(client, "/v1/queue-wait", by="team")}
    # alpha: t1, t2, t3 dispatched 1 s after submission (t4 was cached, never dispatched)
    assert waits[ALPHA]["tasks"] == 3
    assert waits[ALPHA]["p50_s"] == pytest.approx(1.0)
    # beta: t5 held 3 s (dispatched at 3.5 s), t6 at 2 s, t7 at 1 s; t8 is still held
    assert waits[BETA]["tasks"] == 3
    assert waits[BETA]["max_s"] == pytest.approx(3.5)
    assert waits[BETA]["p50_s"] == pytest.approx(2.0)
    held = {r["kind"]: r for r in get(client, "/v1/held")}
    assert held["conflict"]["total_s"] == pytest.approx(3.0)
    assert held["conflict"]["still_held"] == 0
    assert held["quota"]["still_held"] == 1


def test_fleet_overview_by_team_with_held_reasons(client: TestClient) -> None:
    body = get(client, "/v1/overview")
    teams = {t["team"]: t for t in body["teams"]}
    assert (teams[ALPHA]["completed"], teams[ALPHA]["failed"]) == (3, 1)
    assert (teams[BETA]["completed"], teams[BETA]["failed"], teams[BETA]["held"]) == (2, 1, 1)
    assert teams[BETA]["held_by_kind"] == {"quota": 1}
    [held] = [h for h in body["held"] if h["team"] == BETA]
    assert (held["task_id"], held["kind"]) == (f"{P}-t8", "quota")


def test_budgets_spend_against_teams_yaml(client: TestClient) -> None:
    budgets = {b["team"]: b for b in get(client, "/v1/budgets")}
    # teams not in infra/teams.yaml get the defaults: 50 USD per day
    assert budgets[BETA]["budget_usd"] == 50.0
    assert budgets[BETA]["spent_usd"] == pytest.approx(1.002)
    assert budgets[BETA]["state"] == "ok"
    assert {"payments", "search", "platform"} <= set(budgets)
    assert budgets["platform"]["budget_usd"] == 200.0


def test_what_if_frontier_to_small_reprices_tokens_and_estimates_success(
        client: TestClient) -> None:
    body = get(client, "/v1/whatif", shift="50%", **{"from": "frontier"}, to="small")
    haiku = catalog_for(Settings().catalog_file).model("claude-haiku-4-5")
    repriced = 2 * (10_000 * haiku.prices.input + 2000 * haiku.prices.output)
    assert body["target_model"] == "claude-haiku-4-5"
    assert body["selected_cost_usd"] == pytest.approx(1.0)
    assert body["cost_change_usd"] == pytest.approx(0.5 * (repriced - 1.0))
    [debug] = body["by_task_type"]
    assert debug["task_type"] == "debug"
    assert debug["current_success_rate"] == pytest.approx(0.5)     # opus: t5 ok, t6 failed
    assert (debug["b_successes"], debug["b_trials"]) == (1, 1)      # haiku on debug: t7
    lo, hi = wilson(1, 1)
    assert debug["b_interval"] == pytest.approx([lo, hi])
    assert body["moved_tasks"] == pytest.approx(1.0)
    assert body["expected_successes_lost"] == pytest.approx(0.5 - 1.0)
    assert body["successes_lost_interval"] == pytest.approx([0.5 - hi, 0.5 - lo])


def test_what_if_by_task_type_to_a_model_and_bad_parameters(client: TestClient) -> None:
    body = get(client, "/v1/whatif", shift="20", task_type="codegen", to_model="claude-haiku-4-5")
    assert body["selected_cost_usd"] == pytest.approx(0.1)
    assert body["task_types_without_success_data"] == ["codegen"]  # haiku never ran codegen
    [row] = body["by_task_type"]
    assert row["b_interval"] == [0.0, 1.0]
    assert row["expected_successes_lost"] is None
    assert row["successes_lost_interval"] == pytest.approx([0.0, 0.2])  # 20% of 1 task, rate 1
    for params, field in [({"shift": "150%", "to": "small"}, "shift"),
                          ({"shift": "10%", "to": "gigantic"}, "to"),
                          ({"shift": "10%", "to_model": "gpt-99"}, "to_model"),
                          ({"shift": "10%", "from": "huge", "to": "small"}, "from")]:
        r = client.get("/v1/whatif", params=params)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][-1] == field


def test_sql_runs_read_only_queries_with_limits(client: TestClient) -> None:
    r = client.post("/v1/sql", json={"query": "SELECT count() AS n FROM model_calls FINAL;"})
    assert r.status_code == 200, r.text
    assert r.json() == {"columns": ["n"], "rows": [[7]]}
    too_many = client.post("/v1/sql", json={"query": "SELECT number FROM numbers(1000)"})
    assert too_many.status_code == 400
    assert "max rows" in too_many.json()["detail"].lower() or "limit" in too_many.json()["detail"]
    # the session is unchanged afterwards: a normal API query may return many rows
    assert client.get("/v1/tasks", params={"limit": 1000}).status_code == 200


@pytest.mark.parametrize(("query", "reason"), [
    ("DROP TABLE model_calls", "only SELECT"),
    ("INSERT INTO model_calls (task_id) VALUES ('x')", "only SELECT"),
    ("ALTER TABLE events DELETE WHERE 1", "only SELECT"),
    ("CREATE TABLE x (a UInt8) ENGINE = Memory", "only SELECT"),
    ("SELECT 1; DROP TABLE model_calls", "one statement"),
    ("SELECT * FROM model_calls SETTINGS max_result_rows = 0", "SETTINGS"),
    ("SELECT * FROM file('/etc/passwd')", "file()"),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", "OUTFILE"),
])
def test_sql_refuses_writes_ddl_and_escapes(client: TestClient, query: str, reason: str) -> None:
    r = client.post("/v1/sql", json={"query": query})
    assert r.status_code == 403, r.text
    assert reason in r.json()["detail"]
    count = client.post("/v1/sql", json={"query": "SELECT count() FROM model_calls FINAL"})
    assert count.json()["rows"] == [[7]]


def test_timeline_and_audit_chain_verify(client: TestClient) -> None:
    timeline = get(client, f"/v1/tasks/{P}-t3/timeline")
    assert [t["event_type"] for t in timeline] == [
        "TaskSubmitted", "TaskAccepted", "TaskRouted", "TaskDispatched", "TaskStarted",
        "ModelCall", "ToolCall", "ModelCall", "ToolCall", "WorkspaceChange", "TaskCompleted"]
    verdict = get(client, f"/v1/tasks/{P}-t3/verify")
    assert verdict["ok"] is True
    assert verdict["attempts"][0]["events"] == 5


def test_events_keep_the_consumed_avro_bytes(ch_store: Store) -> None:
    rows = ch_store.query_rows(
        f"SELECT avro FROM {ch_store.table('events')} FINAL WHERE task_id = {{t:String}} "
        "LIMIT 1", {"t": f"{P}-t1"})
    assert rows[0][0] in (b"avro-bytes", "avro-bytes")


def _tampered_copy(store: Store, event_id: str, change: dict[str, Any]) -> None:
    """Overwrite a stored event the way someone with write access to ClickHouse could: a newer
    row with the same key replaces it (ReplacingMergeTree keeps the last inserted)."""
    [row] = store.query(f"SELECT * FROM {store.table('events')} FINAL "
                        "WHERE event_id = {e:String}", {"e": event_id})
    payload = json.loads(row["payload"])
    payload.update(change.pop("payload", {}))
    row.update(change, payload=json.dumps(payload))
    row.pop("ingested_at")
    store.insert("events", [tuple(row.values())], list(row))


@pytest.mark.parametrize("tamper", ["changed", "removed", "reordered"])
def test_verify_detects_tampering_in_clickhouse(ch_store: Store, tamper: str) -> None:
    story = next(s for s in stories(f"{P}-{tamper}") if s.task_id.endswith("-t3"))
    events = story.events()
    store_events(ch_store, events, start_offset=1000)
    client = TestClient(create_app(ch_store))
    assert get(client, f"/v1/tasks/{story.task_id}/verify")["ok"] is True
    calls = [e for e in events if isinstance(e, ev.ModelCall)]
    if tamper == "changed":
        _tampered_copy(ch_store, calls[0].event_id, {"payload": {"cost_usd": 0.0001}})
    elif tamper == "removed":
        ch_store.command(f"ALTER TABLE {ch_store.table('events')} DELETE WHERE event_id = "
                         "{e:String} SETTINGS mutations_sync = 2", {"e": calls[1].event_id})
    else:  # swap the two model calls' places in the record (their offsets on the topic)
        [a] = ch_store.query_rows(f"SELECT `offset` FROM {ch_store.table('events')} FINAL "
                                  "WHERE event_id = {e:String}", {"e": calls[0].event_id})
        [b] = ch_store.query_rows(f"SELECT `offset` FROM {ch_store.table('events')} FINAL "
                                  "WHERE event_id = {e:String}", {"e": calls[1].event_id})
        _tampered_copy(ch_store, calls[0].event_id, {"offset": b[0]})
        _tampered_copy(ch_store, calls[1].event_id, {"offset": a[0]})
    verdict = get(client, f"/v1/tasks/{story.task_id}/verify")
    assert verdict["ok"] is False
    problems = " ".join(verdict["attempts"][0]["problems"])
    expected = {"changed": "prev_hash does not match", "removed": "the outcome recorded 5",
                "reordered": "reordered"}[tamper]
    assert expected in problems
