"""Prometheus metrics on a running stack: scraped as a platform team's Prometheus would, before
and after tasks flow (docs/operations.md, "Metrics")."""

from __future__ import annotations

import time
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleetplane.cli.stack import Stack

from .conftest import manifest, submit, wait_terminal


def scrape(http: httpx.Client, url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = http.get(f"{url}/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def test_metrics_move_when_tasks_flow(stack: Stack) -> None:
    team = f"metrics-{uuid.uuid4().hex[:6]}"
    with httpx.Client(timeout=30) as http:
        before = scrape(http, stack.ingest_url)
        ids = {submit(http, stack, manifest(team, f"m{i}", f"summarize {i}")) for i in range(3)}
        refused = http.post(f"{stack.ingest_url}/v1/tasks", json={"spec": {}},
                            headers={"Authorization": f"Bearer {stack.admin_token}"})
        assert refused.status_code == 422
        wait_terminal(http, stack, ids, timeout_s=120)
        after = scrape(http, stack.ingest_url)
        name = "fleetplane_http_requests_total"
        assert sample(after, name, route="/v1/tasks", status="202") - \
            sample(before, name, route="/v1/tasks", status="202") >= 3
        assert sample(after, name, route="/v1/tasks", status="422") >= 1
        assert sample(after, "fleetplane_http_request_seconds_count", route="/v1/tasks") >= 4
        deadline = time.monotonic() + 30
        fleet = scrape(http, stack.accounting_url)
        while sample(fleet, "fleetplane_tasks_finished_total", team=team) < 3 \
                and time.monotonic() < deadline:
            time.sleep(1)
            fleet = scrape(http, stack.accounting_url)
    assert sample(fleet, "fleetplane_tasks_finished_total", outcome="completed", team=team) == 3
    assert sample(fleet, "fleetplane_task_duration_seconds_count", team=team) == 3
    assert sample(fleet, "fleetplane_model_calls_total", team=team) >= 3
    assert sample(fleet, "fleetplane_model_cost_usd_total", team=team) > 0
    assert sample(fleet, "fleetplane_model_tokens_total", team=team, kind="input") > 0
    assert sample(fleet, "fleetplane_tasks_running", team=team) == 0
    assert sample(fleet, "fleetplane_team_running_quota", team=team) > 0
    lag_groups = {dict(ls)["group"] for (n, ls) in fleet if n == "fleetplane_consumer_lag"}
    assert {"fleetplane-ingest", "fleetplane-router", "fleetplane-executor"} <= lag_groups, \
        sorted(lag_groups)
