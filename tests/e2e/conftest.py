"""End-to-end fixtures: the five services as real OS processes on the test broker."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from confluent_kafka import Consumer

from fleetplane.cli.stack import Stack
from fleetplane.core.events import Event
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.states import TERMINAL_STATES

T = TypeVar("T")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The e2e tests that start a stack of their own (test_cli, the tansu smoke test; chaos and
    the reconciler in make test-long) run before the first test that uses the package's
    `stack`, not while it idles beside them: an idle stack is eight processes polling the broker
    (measured 0.49 cores of the 2), each in a session of its own, so under the kernel's
    autogroup scheduling they outweighed the test's own CLI calls and services
    (docs/testing.md). The order within each kind stays as collected."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in item.path.parents]
    e2e = [items[i] for i in slots]
    own = [item for item in e2e if "stack" not in getattr(item, "fixturenames", ())]
    shared = [item for item in e2e if "stack" in getattr(item, "fixturenames", ())]
    for i, item in zip(slots, own + shared, strict=True):
        items[i] = item


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for the e2e tests, on a broker of its own (unless FLEETPLANE_KAFKA_BOOTSTRAP
    names one), so other tests' records do not flow through it. Stopped after the last e2e test
    (package scope): an idle stack polls the embedded broker and would slow every later test."""
    data_dir = tmp_path_factory.mktemp("stack")
    s = Stack(data_dir=data_dir,
              external_bootstrap=os.environ.get("FLEETPLANE_KAFKA_BOOTSTRAP"),
              # every service writes its spans as JSON lines (tests/e2e/test_traces.py)
              extra_env={"FLEETPLANE_TRACE_FILE": str(data_dir / "traces" / "{service}.jsonl")})
    try:
        s.start()
        yield s
    finally:
        s.stop()


def manifest(team: str, name: str, prompt: str, task_type: str = "summarize",
             **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
            "metadata": {"name": name, "team": team},
            "spec": {"taskType": task_type, "prompt": prompt, **spec}}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(http: httpx.Client, stack: Stack, m: dict[str, Any], token: str | None = None) -> str:
    """Submit over HTTP with `token` (default: the stack's admin token, which may submit for
    any team)."""
    resp = http.post(f"{stack.ingest_url}/v1/tasks", json=m,
                     headers=auth(token or stack.admin_token))
    assert resp.status_code == 202, resp.text
    task_id: str = resp.json()["task_id"]
    return task_id


def eventually(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 30.0) -> T:
    """`read()` until `done` holds or `timeout_s` passed; the last value (the caller asserts
    on it). Accounting's figures are eventually consistent across topics: a task's terminal
    row and its model calls (or its start) come from different topics, and the sink may store
    one a batch before the other."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.5)
        value = read()
    return value


def wait_terminal(http: httpx.Client, stack: Stack, ids: set[str],
                  timeout_s: float = 120.0) -> dict[str, dict[str, Any]]:
    """Poll the accounting API (ClickHouse) until every task is in a terminal state."""
    deadline = time.monotonic() + timeout_s
    rows: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        listed = http.get(f"{stack.accounting_url}/v1/tasks",
                          params={"limit": 100_000}).json()
        rows = {r["task_id"]: r for r in listed if r["task_id"] in ids}
        if len(rows) == len(ids) and all(r["state"] in TERMINAL_STATES for r in rows.values()):
            return rows
        time.sleep(0.5)
    states: dict[str, int] = {}
    for r in rows.values():
        states[r["state"]] = states.get(r["state"], 0) + 1
    raise AssertionError(f"{len(ids) - len(rows)} tasks unseen, states {states} "
                         f"after {timeout_s}s; logs in {stack.log_dir}")


def read_topic(settings: Settings, topic: str, ids: set[str],
               idle_s: float = 3.0, timeout_s: float = 60.0) -> list[Event]:
    """Every committed event of `topic` whose task id is in `ids`, read from the start until
    the topic is idle for idle_s after its first record (the group's join before it can take
    longer than idle_s on a loaded machine: a stack's tansu broker was seen to)."""
    c = Consumer({**settings.consumer_config(f"e2e-reader-{time.monotonic_ns()}"),
                  "enable.auto.commit": False})
    c.subscribe([topic])
    serde = default_serde()
    out: list[Event] = []
    deadline = time.monotonic() + timeout_s
    last: float | None = None
    try:
        while time.monotonic() < deadline and (last is None
                                               or time.monotonic() - last < idle_s):
            for m in c.consume(1000, 0.3):
                if m.error():
                    continue
                last = time.monotonic()
                if (m.key() or b"").decode() in ids:
                    out.append(serde.decode(m.value() or b""))
    finally:
        c.close()
    return out


def settings_for(stack: Stack) -> Settings:
    return Settings(kafka_bootstrap=stack.bootstrap, data_dir=Path(stack.data_dir))


@pytest.fixture
def failing_once(stack: Stack) -> Iterator[Callable[[str], None]]:
    """Make the fake provider fail (HTTP 400) the next model call whose prompt has `marker`."""
    with httpx.Client(timeout=30) as http:
        saved = http.get(f"{stack.provider_url}/_fake/script").json()
        replies: list[dict[str, Any]] = []

        def fail(marker: str) -> None:
            replies.append({"match": marker, "times": 1,
                            "error": {"status": 400, "message": "scripted failure"}})
            script = {**saved, "replies": [*saved.get("replies", []), *replies]}
            assert http.post(f"{stack.provider_url}/_fake/script", json=script
                             ).status_code < 300

        yield fail
        http.post(f"{stack.provider_url}/_fake/script", json=saved)
