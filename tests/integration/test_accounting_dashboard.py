"""The dashboard in headless Chromium and the analytics CLI, against the accounting API served
over HTTP (uvicorn) on a real ClickHouse engine holding a known fleet history."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetplane.accounting.api import create_app
from fleetplane.accounting.store import Store
from fleetplane.core import events as ev
from fleetplane.core.catalog import catalog_for
from fleetplane.core.service import serve_http_in_thread
from fleetplane.core.settings import REPO_ROOT, Settings
from tests.integration.browser import chromium, page_text, wait_for
from tests.integration.fleet_history import base_time, stories, utilization_events
from tests.integration.test_accounting import close_test_store, open_test_store
from tests.integration.test_accounting_analytics import store_events

P = "dash"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ch_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = open_test_store(tmp_path_factory.mktemp("accounting-dashboard-ch"))
    history = [e for s in stories(P) for e in s.events()] + utilization_events(base_time())
    history.append(ev.Alert(task_id=f"{P}-t6", team=f"{P}-beta", severity="warning",
                            kind="anomaly.cost_usd", metric="cost_usd", value=0.5, baseline=0.01,
                            message="debug: cost_usd 0.5 on task dash-t6, baseline 0.01"))
    store_events(store, history)
    yield store
    close_test_store(store)


@pytest.fixture(scope="module")
def api_url(ch_store: Store) -> Iterator[str]:
    port = free_port()
    server = serve_http_in_thread(create_app(ch_store, settings=Settings()), "127.0.0.1", port)
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True


def test_dashboard_renders_the_fleet_and_a_task_page(api_url: str, tmp_path: Path) -> None:
    api = httpx.get(f"{api_url}/v1/dashboard", timeout=30).json()
    with chromium(tmp_path / "profile") as driver:

        driver.get(api_url + "/")   # type: ignore[attr-defined]

        def text(css: str) -> str:
            return page_text(driver, css)

        wait_for(lambda: text("#total-completed") == str(api["overview"]["total"]["completed"]),
                 what="fleet totals")
        assert text("#total-held") == "1"
        assert text("#total-failed") == "2"
        assert text("#total-spend") == f"{api['spend_usd']:.6f}" == "1.122000"
        beta = f"tr[data-team='{P}-beta']"
        assert text(f"{beta} .spent") == "1.002000"
        assert text(f"{beta} .budget") == "50.00"
        assert "quota: 1" in text(f"{beta} .held")
        assert text(f"{beta} .done") == "2"
        assert "quota" in text("#held tbody")
        assert text("#util-busy") == "40%"
        assert text("tr[data-executor='exec-1'] .busy") == "40%"  # per executor process
        assert text("tr[data-task-type='debug'] .cost") == "1.002000"
        assert text("tr[data-model='claude-opus-4-7'] .cost") == "1.000000"
        assert "baseline 0.01" in text("#alerts tbody")
        # valued at summarize-on-haiku's cost per success: 0.02 (see test_accounting_analytics)
        assert text("#cache-saved") == "0.020000"
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))   # type: ignore[attr-defined]
        assert shot.stat().st_size > 10_000
        if os.environ.get("FLEETPLANE_UPDATE_SCREENSHOTS"):
            shutil.copy(shot, REPO_ROOT / "docs" / "dashboard.png")

        driver.get(f"{api_url}/tasks/{P}-t3")   # type: ignore[attr-defined]
        wait_for(lambda: "verified" in text("#verdict"), what="task page")
        rows = driver.execute_script(  # type: ignore[attr-defined]
            "return [...document.querySelectorAll('#timeline tbody tr')]"
            ".map(r => r.dataset.event)")
        assert rows == [
            "TaskSubmitted", "TaskAccepted", "TaskRouted", "TaskDispatched", "TaskStarted",
            "ModelCall", "ToolCall", "ModelCall", "ToolCall", "WorkspaceChange", "TaskCompleted"]
        assert "5 audit events" in text("#verdict")
        driver.save_screenshot(str(tmp_path / "task.png"))   # type: ignore[attr-defined]
        if os.environ.get("FLEETPLANE_UPDATE_SCREENSHOTS"):
            shutil.copy(tmp_path / "task.png", REPO_ROOT / "docs" / "dashboard-task.png")


def cli(api_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env: dict[str, Any] = {**os.environ, "FLEETPLANE_ACCOUNTING_URL": api_url,
                           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fleetplane.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_whatif_sql_analytics_and_audit(api_url: str) -> None:
    out = cli(api_url, "whatif", "--shift", "50%", "--from", "frontier", "--to", "small")
    assert out.returncode == 0, out.stderr
    assert "50% of tier frontier -> claude-haiku-4-5" in out.stdout
    assert "expected successes lost: -0.50" in out.stdout
    haiku = catalog_for(Settings().catalog_file).model("claude-haiku-4-5").prices
    change = 0.5 * (2 * (10_000 * haiku.input + 2000 * haiku.output) - 1.0)
    assert f"cost change: {change:+.6f} USD" in out.stdout

    out = cli(api_url, "sql", "SELECT team, count() AS calls FROM model_calls FINAL "
              "GROUP BY team ORDER BY team")
    assert out.returncode == 0, out.stderr
    assert f"{P}-alpha" in out.stdout and "2 rows" in out.stdout
    out = cli(api_url, "sql", "DROP TABLE model_calls")
    assert out.returncode == 1
    assert "refused" in out.stderr and "only SELECT" in out.stderr

    out = cli(api_url, "analytics", "value", "--by", "team")
    assert out.returncode == 0, out.stderr
    assert f"{P}-beta" in out.stdout

    out = cli(api_url, "audit", "verify", "--task", f"{P}-t3")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verified" in out.stdout
    out = cli(api_url, "audit", "replay", "--task", f"{P}-t5", "--source", "clickhouse")
    assert out.returncode == 0, out.stderr
    assert "TaskHeld" in out.stdout and "conflict" in out.stdout
