"""The demo through all five services, then what accounting makes of it: the audit timeline
replayed from the topics equals ClickHouse's and what a stream consumer saw live, and the
dashboard (headless Chromium) shows the demo's numbers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from fleetplane.accounting import audit
from fleetplane.cli.demo import manifests
from fleetplane.cli.stack import Stack
from fleetplane.core.settings import REPO_ROOT
from tests.e2e.conftest import eventually, settings_for, submit, wait_terminal
from tests.integration.browser import chromium, page_text, wait_for
from tests.integration.test_accounting_audit import LiveConsumer

pytestmark = pytest.mark.e2e


def test_demo_audit_replay_and_dashboard(stack: Stack, tmp_path: Path) -> None:
    settings = settings_for(stack)
    live = LiveConsumer(settings)
    try:
        with httpx.Client(timeout=60) as http:
            ids = {submit(http, stack, m) for m in manifests(1)}
            rows = wait_terminal(http, stack, ids)
            completed = [t for t, r in rows.items() if r["state"] == "completed"]
            assert completed, rows
            task_id = completed[0]
            from_kafka = audit.replay_kafka(settings, task_id)
            events = eventually(  # its model call may trail its terminal row by a sink batch
                lambda: http.get(f"{stack.accounting_url}/v1/tasks/{task_id}/events").json(),
                lambda got: len(got) >= len(from_kafka))
            states = http.get(f"{stack.accounting_url}/v1/states").json()
    finally:
        live.close()

    # audit: Kafka replay == ClickHouse == live stream
    from_clickhouse = audit.entries_from_rows(events)
    seen = live.task(task_id)
    assert [e.event.event_id for e in from_kafka] == [e.event.event_id for e in seen]
    assert audit.timeline(from_kafka) == audit.timeline(from_clickhouse) == audit.timeline(seen)
    types = [t["event_type"] for t in audit.timeline(from_kafka)]
    for expected in ("TaskSubmitted", "TaskAccepted", "TaskRouted", "TaskDispatched",
                     "TaskStarted", "ModelCall", "TaskCompleted"):
        assert expected in types, types

    # the dashboard shows the demo's numbers
    with chromium(tmp_path / "profile") as driver:
        from selenium.webdriver.common.by import By

        def text(css: str) -> str:
            return page_text(driver, css)

        driver.get(stack.accounting_url + "/")   # type: ignore[attr-defined]
        wait_for(lambda: text("#total-completed") == str(states.get("completed", 0)),
                 what="completed count")

        def spend_as_the_api_says() -> bool:  # both may still take in a trailing model call
            cost = {r["team"]: r["cost_usd"] for r in httpx.get(
                f"{stack.accounting_url}/v1/cost", params={"by": "team"}, timeout=30).json()}
            return all(text(f"tr[data-team='{team}'] .spent") == f"{cost[team]:.6f}"
                       for team in ("payments", "search", "platform")) and \
                float(text("#total-spend")) == pytest.approx(sum(cost.values()), abs=1e-6)

        wait_for(spend_as_the_api_says, what="the dashboard's spend equal to /v1/cost")
        driver.save_screenshot(str(tmp_path / "demo.png"))   # type: ignore[attr-defined]
        if os.environ.get("FLEETPLANE_UPDATE_SCREENSHOTS"):
            shutil.copy(tmp_path / "demo.png", REPO_ROOT / "docs" / "dashboard-demo.png")
        driver.get(f"{stack.accounting_url}/tasks/{task_id}")   # type: ignore[attr-defined]
        wait_for(lambda: len(driver.find_elements(  # type: ignore[attr-defined]
            By.CSS_SELECTOR, "#timeline tbody tr")) == len(from_clickhouse), what="timeline")
