"""The accounting HTTP API over a real ClickHouse engine (rows written through the sink)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleetplane.accounting.api import create_app
from fleetplane.accounting.rows import rows_for
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.accounting.store import Store
from fleetplane.core import events as ev
from fleetplane.core.loop import Record
from fleetplane.core.states import STATES
from tests.integration.test_accounting import close_test_store, model_call, open_test_store, spec

TEAM = "api-team"


@pytest.fixture(scope="module")
def ch_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = open_test_store(tmp_path_factory.mktemp("accounting-api-ch"))
    yield store
    close_test_store(store)


@pytest.fixture(scope="module")
def published(ch_store: Store) -> list[ev.Event]:
    """Two tasks of TEAM (one completed, one running) and one of another team."""
    s = spec("review")
    events: list[ev.Event] = [
        ev.TaskSubmitted(task_id="api-1", team=TEAM, spec=s),
        ev.TaskRouted(task_id="api-1", team=TEAM, spec=s, attempt=1, model="claude-sonnet-4-5",
                      provider="anthropic", tier="standard", reason="default"),
        ev.TaskStarted(task_id="api-1", team=TEAM, attempt=1, executor_id="e"),
        model_call("api-1", TEAM, 0, 0.25),
        model_call("api-1", TEAM, 1, 0.5),
        ev.TaskCompleted(task_id="api-1", team=TEAM, attempt=1, model="claude-sonnet-4-5",
                         output="ok", cost_usd=0.75, duration_ms=10),
        ev.TaskSubmitted(task_id="api-2", team=TEAM, spec=spec("triage")),
        ev.TaskStarted(task_id="api-2", team=TEAM, attempt=1, executor_id="e"),
        model_call("api-2", TEAM, 0, 0.125, model="gpt-4o-mini", tier="small"),
        ev.TaskSubmitted(task_id="api-3", team="other-team", spec=s),
        model_call("api-3", "other-team", 0, 9.0),
    ]
    sink = ClickHouseSink(ch_store)
    for offset, event in enumerate(events):
        sink.add(rows_for(event, Record("test", 0, offset, None, b"")))
    sink.add(rows_for(events[3], Record("test", 0, 3, None, b"")))  # a redelivery
    sink.flush()
    return events


@pytest.fixture(scope="module")
def client(ch_store: Store, published: list[ev.Event]) -> Iterator[TestClient]:
    with TestClient(create_app(ch_store, status=lambda: {"processed": 42})) as c:
        yield c


def error_fields(body: dict[str, Any]) -> list[str]:
    return [str(d["loc"][-1]) for d in body["detail"]]


def test_healthz_reports_clickhouse_and_processor_status(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.json()["clickhouse"] == "ok"
    assert r.json()["processed"] == 42


def test_cost_by_each_dimension(client: TestClient) -> None:
    r = client.get("/v1/cost", params={"by": "team"})
    assert r.status_code == 200
    by_team = {row["team"]: row for row in r.json()}
    assert by_team[TEAM]["cost_usd"] == pytest.approx(0.875)
    assert by_team[TEAM]["calls"] == 3
    assert by_team[TEAM]["tasks"] == 2
    assert by_team["other-team"]["cost_usd"] == pytest.approx(9.0)
    assert [row["team"] for row in r.json()] == ["other-team", TEAM]  # most expensive first

    rows = client.get("/v1/cost", params={"by": "task_type", "team": TEAM}).json()
    assert {row["task_type"]: row["cost_usd"] for row in rows} == {
        "review": pytest.approx(0.75), "triage": pytest.approx(0.125)}
    rows = client.get("/v1/cost", params={"by": "model", "team": TEAM}).json()
    assert {row["model"]: row["calls"] for row in rows} == {
        "claude-sonnet-4-5": 2, "gpt-4o-mini": 1}
    rows = client.get("/v1/cost", params={"by": "tier", "team": TEAM}).json()
    assert {row["tier"] for row in rows} == {"standard", "small"}
    assert set(rows[0]) == {"tier", "cost_usd", "calls", "tasks", "input_tokens",
                            "output_tokens", "cache_creation_input_tokens",
                            "cache_read_input_tokens"}


def test_cost_time_window(client: TestClient) -> None:
    rows = client.get("/v1/cost", params={"team": TEAM, "since": "2000-01-01T00:00:00Z",
                                          "until": "2100-01-01"}).json()
    assert rows[0]["calls"] == 3
    assert client.get("/v1/cost", params={"team": TEAM, "until": "2000-01-01"}).json() == []


@pytest.mark.parametrize(("path", "params", "field"), [
    ("/v1/cost", {"by": "colour"}, "by"),
    ("/v1/cost", {"since": "yesterday-ish"}, "since"),
    ("/v1/tasks", {"state": "sleeping"}, "state"),
    ("/v1/tasks", {"limit": 0}, "limit"),
    ("/v1/tasks", {"limit": "many"}, "limit"),
    ("/v1/tasks", {"team": ""}, "team"),
    ("/v1/tasks/api-1/events", {"limit": -1}, "limit"),
])
def test_bad_query_parameters_are_422_naming_the_field(
    client: TestClient, path: str, params: dict[str, Any], field: str
) -> None:
    r = client.get(path, params=params)
    assert r.status_code == 422
    assert error_fields(r.json()) == [field]


def test_task_list_with_filters(client: TestClient) -> None:
    rows = client.get("/v1/tasks", params={"team": TEAM}).json()
    assert {row["task_id"]: row["state"] for row in rows} == {
        "api-1": "completed", "api-2": "running"}
    [done] = client.get("/v1/tasks", params={"team": TEAM, "state": "completed"}).json()
    assert done["task_id"] == "api-1"
    assert done["task_type"] == "review"
    assert done["model"] == "claude-sonnet-4-5"
    assert done["cost_usd"] == pytest.approx(0.75)
    assert datetime.fromisoformat(done["updated_at"]).utcoffset() == timedelta(0)
    assert len(client.get("/v1/tasks", params={"limit": 1}).json()) == 1
    assert client.get("/v1/tasks", params={"team": "nobody"}).json() == []


def test_state_counts(client: TestClient) -> None:
    assert client.get("/v1/states", params={"team": TEAM}).json() == {
        "completed": 1, "running": 1}


def test_task_events_in_order_each_once(client: TestClient, published: list[ev.Event]) -> None:
    r = client.get("/v1/tasks/api-1/events")
    assert r.status_code == 200
    body = r.json()
    assert [e["event_id"] for e in body] == [e.event_id for e in published[:6]]
    assert body[3]["payload"]["cost_usd"] == 0.25
    assert set(body[0]) == {"event_id", "event_type", "task_id", "team", "occurred_at",
                            "causation_id", "topic", "partition", "offset", "payload"}
    r = client.get("/v1/tasks/no-such-task/events")
    assert r.status_code == 404
    assert "no-such-task" in r.json()["detail"]


def test_api_states_are_the_states_rows_are_written_in(client: TestClient) -> None:
    """The state filter accepts exactly the states the sink writes (core.states), in the
    OpenAPI document clients generate from, and refuses others with the field."""
    spec = client.get("/openapi.json").json()
    params = spec["paths"]["/v1/tasks"]["get"]["parameters"]
    state = next(p for p in params if p["name"] == "state")
    enum = next(s["enum"] for s in state["schema"]["anyOf"] if "enum" in s)
    assert enum == list(STATES)
    bad = client.get("/v1/tasks", params={"state": "sleeping"})
    assert bad.status_code == 422 and "state" in bad.text


def test_task_list_filters_by_task_type_and_task_id(client: TestClient) -> None:
    """Used by ingest's team-scoped GET /v1/tasks?type= and GET /v1/tasks/{id} (issue 3)."""
    rows = client.get("/v1/tasks", params={"team": TEAM, "task_type": "triage"}).json()
    assert [r["task_id"] for r in rows] == ["api-2"]
    [one] = client.get("/v1/tasks", params={"task_id": "api-3"}).json()
    assert one["team"] == "other-team"
    assert client.get("/v1/tasks", params={"task_id": "nope"}).json() == []
