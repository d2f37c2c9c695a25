"""The coordinator's own metrics: queue depth, held tasks by kind, running against capacity
(read from its views when scraped), admission latency (routed -> dispatched) and its decisions
(from the events it handles and publishes)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleetplane.core import events as ev
from fleetplane.core.bounded import Bounded

ADMISSION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600,
                     14400)


class Queue(Collector):
    """Gauges from the active coordinator's views (a standby reports only its role):
    fleetplane_coordinator_active (1 in the active role), fleetplane_coordinator_queued{team},
    fleetplane_coordinator_held{kind}, fleetplane_coordinator_running{team},
    fleetplane_coordinator_capacity, fleetplane_coordinator_table_rows{state}."""

    def __init__(self, fleet: Callable[[], dict[str, Any]],
                 held: Callable[[], list[dict[str, Any]]]) -> None:
        self.fleet = fleet
        self.held = held

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self.fleet()
        ready = bool(view.get("ready"))
        yield GaugeMetricFamily("fleetplane_coordinator_active", "1 when this process holds "
                                "the active role and its state is loaded", value=int(ready))
        if not ready:
            return
        queued = GaugeMetricFamily("fleetplane_coordinator_queued", "Tasks waiting for "
                                   "admission, by team", labels=["team"])
        held = GaugeMetricFamily("fleetplane_coordinator_held", "Waiting tasks by what holds "
                                 "them (queued: nothing but their turn)", labels=["kind"])
        by_team: dict[str, int] = {}
        by_kind: dict[str, int] = {}
        for row in self.held():
            by_team[row["team"]] = by_team.get(row["team"], 0) + 1
            by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + 1
        for team, n in sorted(by_team.items()):
            queued.add_metric([team], n)
        for kind, n in sorted(by_kind.items()):
            held.add_metric([kind], n)
        running = GaugeMetricFamily("fleetplane_coordinator_running", "Attempts dispatched "
                                    "and not finished, by team", labels=["team"])
        for team, n in sorted(view.get("running", {}).items()):
            running.add_metric([team], n)
        yield queued
        yield held
        yield running
        yield GaugeMetricFamily("fleetplane_coordinator_capacity", "Fleet capacity "
                                "(coordinator_max_running)", value=view.get("max_running", 0))
        yield GaugeMetricFamily("fleetplane_coordinator_kill_switch", "1 while the kill switch "
                                "is on", value=int(bool(view.get("kill_switch"))))
        rows = GaugeMetricFamily("fleetplane_coordinator_table_rows", "Task rows in the "
                                 "scheduler's table: finished ones are kept until the retention "
                                 "or the cap forgets them", labels=["state"])
        finished = int(view.get("finished_rows", 0))
        rows.add_metric(["finished"], finished)
        rows.add_metric(["unfinished"], int(view.get("task_rows", 0)) - finished)
        yield rows


class Decisions:
    """Admission latency and decisions. `routed` sees the scheduler's inputs (a TaskRouted
    starts the clock of its attempt), `published` its outputs (TaskDispatched stops it)."""

    def __init__(self, registry: CollectorRegistry, memory: int = 200_000) -> None:
        self.admission = Histogram("fleetplane_coordinator_admission_seconds", "Routed to "
                                   "dispatched, per attempt (queueing and holds included)",
                                   buckets=ADMISSION_BUCKETS, registry=registry)
        self.decisions = Counter("fleetplane_coordinator_decisions", "What the coordinator "
                                 "published: dispatch, hold (by kind), fail, cancel, ...",
                                 ["decision", "kind"], registry=registry)
        self.dispatch = Histogram("fleetplane_coordinator_dispatch_seconds", "Dispatched to "
                                  "started by an executor (TaskStarted), per attempt: how long "
                                  "a dispatch waits for an executor slot",
                                  buckets=ADMISSION_BUCKETS, registry=registry)
        self._lock = threading.Lock()
        self._routed: Bounded[tuple[str, int], datetime] = Bounded(memory)
        self._dispatched: Bounded[tuple[str, int], datetime] = Bounded(memory)

    def routed(self, event: ev.Event) -> None:
        """Every scheduler input (named for the TaskRouted that starts admission's clock; a
        TaskStarted stops the dispatch clock)."""
        if isinstance(event, ev.TaskRouted):
            with self._lock:
                if (event.task_id, event.attempt) not in self._routed:
                    self._routed.put((event.task_id, event.attempt), event.occurred_at)
        elif isinstance(event, ev.TaskStarted):
            with self._lock:
                at = self._dispatched.pop((event.task_id, event.attempt), None)
            if at is not None:
                self.dispatch.observe(max(0.0, (event.occurred_at - at).total_seconds()))

    def published(self, event: ev.Event) -> None:
        if isinstance(event, ev.TaskDispatched):
            self.decisions.labels("dispatch", "").inc()
            with self._lock:
                at = self._routed.pop((event.task_id, event.attempt), None)
                if event.action != "rollback":
                    self._dispatched.put((event.task_id, event.attempt), event.occurred_at)
            if at is not None:
                self.admission.observe(max(0.0, (event.occurred_at - at).total_seconds()))
        elif isinstance(event, ev.TaskHeld):
            self.decisions.labels("hold", event.kind or "unknown").inc()
        elif isinstance(event, ev.TaskFailed | ev.TaskCancelled | ev.TaskRolledBack
                        | ev.TaskAbandoned | ev.TaskCompleted):
            self.decisions.labels(type(event).__name__.removeprefix("Task").lower(), "").inc()
