"""The reconciler's own metrics, read from its stats view when scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class ReconcilerStats(Collector):
    """fleetplane_reconciler_redrives_total{hop}, fleetplane_reconciler_gave_up_total,
    fleetplane_reconciler_tasks{waiting_at} (tasks tracked, by the hop they wait at) and
    fleetplane_reconciler_last_scan_age_seconds, from Reconciler.view()."""

    def __init__(self, view: Callable[[], dict[str, Any]]) -> None:
        self.view = view

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        view = self.view()
        counters = view.get("counters") or {}
        redrives = CounterMetricFamily("fleetplane_reconciler_redrives", "Input records "
                                       "re-published because a hop did not answer, by hop",
                                       labels=["hop"])
        gave_up = CounterMetricFamily("fleetplane_reconciler_gave_up", "Hops the reconciler "
                                      "gave up on (a critical alert each)", labels=["hop"])
        for key, n in sorted(counters.items()):
            name, _, hop = str(key).partition(".")
            if name == "redrives":
                redrives.add_metric([hop], n)
            elif name == "gave_up":
                gave_up.add_metric([hop], n)
        yield redrives
        yield gave_up
        tasks = GaugeMetricFamily("fleetplane_reconciler_tasks", "Tasks tracked, by the hop "
                                  "they wait at (none: finished or not waiting)",
                                  labels=["waiting_at"])
        for hop, n in sorted((view.get("waiting_at") or {}).items()):
            tasks.add_metric([hop], n)
        yield tasks
        age = view.get("last_scan_s_ago")
        if age is not None:
            yield GaugeMetricFamily("fleetplane_reconciler_last_scan_age_seconds", "Seconds "
                                    "since the reconciler's last scan", value=age)
