"""The executor's own metrics: slots busy and free, attempts running, model and tool call
latency (from the ModelCall and ToolCall events it publishes: its own measurements)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleetplane.core import events as ev

CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
TOOL_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Slots(Collector):
    """fleetplane_executor_slots{state=busy|free} and fleetplane_executor_attempts_running,
    read when scraped."""

    def __init__(self, slots: int, busy: Callable[[], int], running: Callable[[], int]) -> None:
        self.slots = slots
        self.busy = busy
        self.running = running

    def collect(self) -> Iterator[GaugeMetricFamily]:
        busy = self.busy()
        family = GaugeMetricFamily("fleetplane_executor_slots", "Executor slots (one attempt "
                                   "each), busy or free", labels=["state"])
        family.add_metric(["busy"], busy)
        family.add_metric(["free"], max(0, self.slots - busy))
        yield family
        yield GaugeMetricFamily("fleetplane_executor_attempts_running", "Attempts running in "
                                "this executor (begun, not ended)", value=self.running())


class Calls:
    """Model and tool call latency histograms, fed by the events the executor publishes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.model = Histogram("fleetplane_executor_model_call_seconds", "Model call latency "
                               "as the executor measured it, by model and outcome",
                               ["model", "outcome"], buckets=CALL_BUCKETS, registry=registry)
        self.tool = Histogram("fleetplane_executor_tool_call_seconds", "Tool call duration, "
                              "by tool and outcome", ["tool", "outcome"], buckets=TOOL_BUCKETS,
                              registry=registry)

    def observe(self, event: ev.Event) -> None:
        if isinstance(event, ev.ModelCall):
            self.model.labels(event.model, event.outcome).observe(
                max(0.0, event.latency_ms / 1000))
        elif isinstance(event, ev.ToolCall):
            self.tool.labels(event.tool, event.outcome).observe(
                max(0.0, event.duration_ms / 1000))
