"""Per-loop metrics (core/loop.py, core/parallel.py): what every service's consume-transform-
produce loops consume, how long handling and commits take, aborts and errors."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from fleetplane.core.events import Event
from fleetplane.core.loop import Instruments, Output, Record

HANDLE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                  10, 30, 60, 300, 1800)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: sees each decoded input event (a service's own metrics, e.g. the coordinator's admission)
InputHook = Callable[[Event], None]


class LoopFamilies:
    """The metric families, one set per registry (labels say service and consumer group)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.records = Counter("fleetplane_loop_records", "Records consumed, by service, "
                               "consumer group and topic", ["service", "group", "topic"],
                               registry=r)
        self.batches = Counter("fleetplane_loop_batches", "Batches taken from the consumer",
                               ["service", "group"], registry=r)
        self.handle = Histogram("fleetplane_loop_handle_seconds", "Handling time of one record "
                                "(decode excluded), by service and event type",
                                ["service", "event_type"], buckets=HANDLE_BUCKETS, registry=r)
        self.commit = Histogram("fleetplane_loop_commit_seconds", "Checkpoint latency: the "
                                "transaction commit (outputs and offsets), or flush and offset "
                                "store", ["service", "group"], buckets=COMMIT_BUCKETS,
                                registry=r)
        self.aborts = Counter("fleetplane_loop_aborts", "Transactions aborted",
                              ["service", "group"], registry=r)
        self.errors = Counter("fleetplane_loop_errors", "Records whose handling failed, by "
                              "error class and what the loop did (retry, dead_letter, fatal)",
                              ["service", "error_class", "action"], registry=r)


class LoopMetrics(Instruments):
    """One Processor's instruments (children of the families, cached per label value)."""

    def __init__(self, families: LoopFamilies, service: str, group: str,
                 inputs: Sequence[InputHook] = ()) -> None:
        self.f = families
        self.service = service
        self.group = group
        self.inputs = inputs  # the caller's list: hooks added later apply too
        self._batches = families.batches.labels(service, group)
        self._commit = families.commit.labels(service, group)
        self._aborts = families.aborts.labels(service, group)
        self._records: dict[str, Counter] = {}
        self._handle: dict[str, Histogram] = {}

    def consumed(self, records: Sequence[Record]) -> None:
        self._batches.inc()
        counts: dict[str, int] = {}
        for rec in records:
            counts[rec.topic] = counts.get(rec.topic, 0) + 1
        for topic, n in counts.items():
            child = self._records.get(topic)
            if child is None:
                child = self._records[topic] = self.f.records.labels(self.service, self.group,
                                                                     topic)
            child.inc(n)

    def handle(self, event: Event, rec: Record, run: Callable[[], list[Output]]
               ) -> list[Output]:
        for hook in self.inputs:
            hook(event)
        kind = type(event).__name__
        child = self._handle.get(kind)
        if child is None:
            child = self._handle[kind] = self.f.handle.labels(self.service, kind)
        started = time.perf_counter()
        try:
            return run()
        finally:
            child.observe(time.perf_counter() - started)

    def error(self, exc: BaseException, action: str) -> None:
        self.f.errors.labels(self.service, type(exc).__name__, action).inc()

    def committed(self, seconds: float) -> None:
        self._commit.observe(seconds)

    def aborted(self) -> None:
        self._aborts.inc()
