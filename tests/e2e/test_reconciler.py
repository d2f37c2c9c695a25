"""The reconciler heals a task whose next event was lost (issue 19).

The router runs in this process and, for one task, produces its TaskRouted to a side topic
instead of tasks.routed (the router read the TaskAccepted and committed; the decision never
reached the coordinator, as when a broker loses acknowledged writes). The other services run as
OS processes with the reconciler. The reconciler must re-drive the task, which then completes
exactly once, with the reason on its timeline."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from fleetplane.cli.stack import Stack
from fleetplane.core import events as ev
from fleetplane.core.loop import Output, Processor, RawRecord, Record
from fleetplane.core.serde import default_serde
from fleetplane.core.topics import TopicSpec, ensure_topics
from fleetplane.ingest.idempotency import task_id_for
from fleetplane.router.main import INPUTS, build_router
from fleetplane.testing.invariants import check, read_log
from tests.e2e.conftest import eventually, manifest, submit, wait_terminal

pytestmark = [pytest.mark.e2e, pytest.mark.reliability, pytest.mark.long]

SIDE_TOPIC = "test.routed.dropped"


class DroppingRouter:
    """The real router; the first TaskRouted of each task in `drop` goes to SIDE_TOPIC."""

    def __init__(self, inner: Any, drop: set[str]) -> None:
        self.inner, self.drop = inner, drop
        self.dropped: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, event: ev.Event, record: Record) -> list[Output]:
        out: list[Output] = []
        for e in self.inner(event, record):
            with self.lock:
                hit = isinstance(e, ev.TaskRouted) and e.task_id in self.drop \
                    and e.task_id not in self.dropped
                if hit:
                    self.dropped.append(e.task_id)
            if hit:
                out.append(RawRecord(SIDE_TOPIC, e.task_id.encode(),
                                     default_serde().encode(e), 0))
            else:
                out.append(e)
        return out


def side_topic_records(stack: Stack) -> list[str]:
    """The task ids of the committed records on the side topic."""
    c = Consumer({**stack.settings().client_config(), "group.id": "side-reader",
                  "isolation.level": "read_committed", "enable.auto.commit": False})
    out: list[str] = []
    try:
        c.assign([TopicPartition(SIDE_TOPIC, 0, 0)])
        deadline = time.monotonic() + 20
        idle = 0
        while time.monotonic() < deadline and idle < 3:
            msgs = c.consume(100, 1.0)
            idle = 0 if msgs else idle + 1
            out += [(m.key() or b"").decode() for m in msgs if m.error() is None]
    finally:
        c.close()
    return out


def test_a_dropped_task_routed_is_re_driven_and_completes_once(tmp_path: Path) -> None:
    stack = Stack(data_dir=tmp_path / "stack",
                  services=("ingest", "coordinator", "executor", "accounting", "reconciler"),
                  coordinator_standby=False,
                  extra_env={"FLEETPLANE_RECONCILER_DEADLINE_S": "3",
                             "FLEETPLANE_RECONCILER_SCAN_S": "1"})
    router_thread: threading.Thread | None = None
    processor: Processor | None = None
    try:
        stack.start(timeout_s=240)
        settings = stack.settings()
        ensure_topics(settings.client_config(), [TopicSpec(SIDE_TOPIC, "task_id", 1, 1, -1,
                                                           "delete")])
        team = f"heal-{int(time.time())}"
        with httpx.Client(timeout=30) as http:
            key = f"reconcile-{time.time_ns()}"
            dropped_id = task_id_for(team, key)  # HTTP task ids derive from the key
            router = DroppingRouter(build_router(settings), {dropped_id})
            processor = Processor("router", INPUTS, router, settings)
            router_thread = threading.Thread(target=processor.run, daemon=True)
            router_thread.start()
            m = manifest(team, "dropped", "[reconciler] summarize this")
            m["idempotencyKey"] = key
            first = submit(http, stack, m)
            assert first == dropped_id
            other = submit(http, stack, manifest(team, "kept", "[reconciler] and this"))
            rows = wait_terminal(http, stack, {first, other}, timeout_s=180)
            assert rows[first]["state"] == "completed"
            assert rows[other]["state"] == "completed"
            assert router.dropped == [first], "the router's first decision was dropped"
            assert side_topic_records(stack) == [first]
            stats = http.get(f"{stack.reconciler_url}/reconciler/stats").json()
            assert stats["counters"].get("redrives.router") == 1, stats
            kinds = eventually(  # the alert comes from another topic than the outcome
                lambda: [e.get("event_type") for e in http.get(
                    f"{stack.accounting_url}/v1/tasks/{first}/timeline").json()],
                lambda kinds: "Alert" in kinds)
            assert "Alert" in kinds, kinds
        log = read_log(settings, {first, other}.__contains__)
        verdict = check(log, {first, other}, lambda _t: 100)
        assert verdict.ok, verdict.counts()
        completed = [e for e in log.of(ev.TaskCompleted) if e.task_id == first]
        assert len(completed) == 1, "completed exactly once"
    finally:
        if processor is not None:
            processor.stop()
        if router_thread is not None:
            router_thread.join(30)
        stack.stop()
