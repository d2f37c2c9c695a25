"""The fleetplane-accounting process: its API answers, SIGKILL + restart counts every event once,
SIGTERM exits cleanly.

It runs on a private broker: the service always joins the consumer group "fleetplane-accounting",
whose committed offsets must not leak into other tests on the shared broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import REPO_ROOT, Settings
from fleetplane.infra.broker import EmbeddedBroker, free_port
from tests.integration.test_accounting import model_call, spec


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[str]:
    broker = EmbeddedBroker(tmp_path / "broker")
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


class Service:
    def __init__(self, tmp: Path, bootstrap: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "accounting.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT / "services"), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
            "FLEETPLANE_KAFKA_BOOTSTRAP": bootstrap,
            "FLEETPLANE_CLICKHOUSE_DSN": f"chdb://{(tmp / 'clickhouse').as_posix()}",
            "FLEETPLANE_DATA_DIR": str(tmp / "data"),
            "FLEETPLANE_ACCOUNTING_PORT": str(self.port),
            "FLEETPLANE_LOG_JSON": "false",
            # chdb inserts go through temp files; one killed mid-insert stays in this test's dir
            "TMPDIR": str(tmp),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleetplane.accounting.main"], env=self.env,
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.wait(lambda: self.get("/healthz").status_code == 200, "healthz")

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(self.url + path, params=params, timeout=10)

    def wait(self, check: Any, what: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"accounting exited ({self.proc.returncode}): "
                                     f"{self.log.read_text()[-3000:]}")
            try:
                if check():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}: {self.log.read_text()[-3000:]}")

    def signal(self, sig: int, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def kill_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_service_restarts_after_sigkill_and_stops_cleanly_on_sigterm(
    tmp_path: Path, private_broker: str
) -> None:
    team = "main-team"
    service = Service(tmp_path, private_broker)
    producer: EventProducer | None = None
    try:
        service.start()
        producer = EventProducer(Settings(kafka_bootstrap=private_broker))
        first = [model_call("main-1", team, i, 0.5) for i in range(10)]
        producer.send([ev.TaskSubmitted(task_id="main-1", team=team, spec=spec()), *first])

        def cost() -> tuple[int, float]:
            rows = service.get("/v1/cost", by="team", team=team).json()
            return (rows[0]["calls"], rows[0]["cost_usd"]) if rows else (0, 0.0)

        service.wait(lambda: cost()[0] == 10, "first calls")
        assert service.signal(signal.SIGKILL) == -signal.SIGKILL

        # Offsets may not have been committed: the restart re-reads, dedup keeps counts exact.
        # (It also gets its partitions back at once: static group membership, see main.py.)
        service.start()
        second = [model_call("main-1", team, i, 0.25) for i in range(10, 15)]
        done = ev.TaskCompleted(task_id="main-1", team=team, attempt=1, model="m", output="ok",
                                cost_usd=6.25, duration_ms=1)
        producer.send([*second, first[0], done])  # first[0] again: a duplicate
        service.wait(lambda: cost()[0] == 15 and service.get("/v1/states", team=team).json()
                     == {"completed": 1}, "second calls and completion")
        calls, total = cost()
        assert calls == 15
        assert total == pytest.approx(10 * 0.5 + 5 * 0.25)
        [task] = service.get("/v1/tasks", team=team).json()
        assert (task["state"], task["model_calls"]) == ("completed", 15)
        events = service.get("/v1/tasks/main-1/events").json()
        assert len(events) == 17
        assert service.get("/v1/cost", by="nope").status_code == 422

        assert service.signal(signal.SIGTERM) == 0
        assert "accounting stopped" in service.log.read_text()
    finally:
        if producer is not None:
            producer.close()
        service.kill_if_running()
