"""Prometheus metrics on a running stack: scraped as a platform team's Prometheus would, before
and after tasks flow (docs/operations.md, "Metrics")."""

from __future__ import annotations

import time
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleetplane.cli.stack import Stack

from .conftest import manifest, submit, wait_terminal

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: httpx.Client, url: str) -> Samples:
    resp = http.get(f"{url}/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def lag_groups_of(samples: Samples) -> set[str]:
    return {dict(ls)["group"] for (n, ls) in samples if n == "fleetplane_consumer_lag"}


def scrape_all(http: httpx.Client, stack: Stack, timeout_s: float = 120.0
               ) -> dict[str, Samples]:
    """Every service's /metrics (the URLs `fleetplane up` prints), by process name; waits for
    a process still starting (the standby coordinator starts after the others are ready)."""
    out = {}
    deadline = time.monotonic() + timeout_s
    for name, url in stack.metrics_urls().items():
        while True:
            try:
                out[name] = scrape(http, url.removesuffix("/metrics"))
                break
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    return out


def moved(before: dict[str, Samples], after: dict[str, Samples], process: str, name: str,
          **labels: str) -> float:
    return sample(after[process], name, **labels) - sample(before[process], name, **labels)


def test_metrics_move_when_tasks_flow(stack: Stack) -> None:
    team = f"metrics-{uuid.uuid4().hex[:6]}"
    with httpx.Client(timeout=30) as http:
        every_before = scrape_all(http, stack)
        before = every_before["ingest"]
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
        # the lag is read at most every 10 s (its cache): a scrape before the tasks ran may
        # still be what the first scrapes after them answer
        want_groups = {"fleetplane-ingest", "fleetplane-router", "fleetplane-executor",
                       "fleetplane-accounting"}
        deadline = time.monotonic() + 45
        fleet = scrape(http, stack.accounting_url)
        while (sample(fleet, "fleetplane_tasks_finished_total", team=team) < 3
               or sample(fleet, "fleetplane_task_duration_seconds_count", team=team) < 3
               # the calls come from another topic than the outcomes: they may trail them
               or sample(fleet, "fleetplane_model_calls_total", team=team) < 3
               or not want_groups <= lag_groups_of(fleet)) and time.monotonic() < deadline:
            time.sleep(1)
            fleet = scrape(http, stack.accounting_url)
        every_after = scrape_all(http, stack)
        active = stack.active_coordinator()
    assert sample(fleet, "fleetplane_tasks_finished_total", outcome="completed", team=team) == 3
    assert sample(fleet, "fleetplane_task_duration_seconds_count", team=team) == 3
    assert sample(fleet, "fleetplane_model_calls_total", team=team) >= 3
    assert sample(fleet, "fleetplane_model_cost_usd_total", team=team) > 0
    assert sample(fleet, "fleetplane_model_tokens_total", team=team, kind="input") > 0
    assert sample(fleet, "fleetplane_tasks_running", team=team) == 0
    assert sample(fleet, "fleetplane_team_running_quota", team=team) > 0
    lag_groups = lag_groups_of(fleet)
    assert {"fleetplane-ingest", "fleetplane-router", "fleetplane-executor"} <= lag_groups, \
        sorted(lag_groups)
    assert "fleetplane-accounting" in lag_groups, sorted(lag_groups)
    # every service's own loops, and what only it knows
    b, a = every_before, every_after
    assert moved(b, a, "ingest", "fleetplane_loop_records_total", service="ingest") >= 3
    assert moved(b, a, "router", "fleetplane_loop_handle_seconds_count", service="router",
                 event_type="TaskAccepted") >= 3
    assert moved(b, a, "router", "fleetplane_loop_commit_seconds_count", service="router") >= 1
    assert active is not None
    assert sample(a[active], "fleetplane_coordinator_active") == 1
    assert moved(b, a, active, "fleetplane_coordinator_decisions_total",
                 decision="dispatch") >= 3
    assert moved(b, a, active, "fleetplane_coordinator_admission_seconds_count") >= 3
    assert moved(b, a, active, "fleetplane_loop_records_total", service="coordinator") >= 6
    standby = "coordinator-b" if active == "coordinator" else "coordinator"
    assert sample(a[standby], "fleetplane_coordinator_active") == 0
    assert moved(b, a, "executor", "fleetplane_executor_model_call_seconds_count") >= 3
    assert moved(b, a, "executor", "fleetplane_loop_records_total", service="executor") >= 3
    slots = sample(a["executor"], "fleetplane_executor_slots")
    assert slots == stack.settings().executor_slots and \
        sample(a["executor"], "fleetplane_executor_slots", state="busy") <= slots
    assert moved(b, a, "accounting", "fleetplane_loop_records_total",
                 service="accounting") >= 12
    assert 0 <= sample(a["reconciler"], "fleetplane_reconciler_last_scan_age_seconds") < 60
    for name, samples in a.items():  # every process reports its CPU and memory
        assert sample(samples, "process_resident_memory_bytes") > 0, name
