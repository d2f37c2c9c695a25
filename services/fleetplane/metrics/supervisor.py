"""The embedded stack's supervisor (`fleetplane up`): restarts per service and whether each
process is up, for Prometheus (the supervisor counts restarts; `fleetplane status` shows them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class Restarts(Collector):
    """fleetplane_service_restarts_total{service} and fleetplane_service_up{service} from a
    `describe()` of the stack (fleetplane.cli.stack.Stack.describe)."""

    def __init__(self, describe: Callable[[], dict[str, Any]],
                 alive: Callable[[str], bool]) -> None:
        self.state = describe
        self.alive = alive

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        state = self.state()
        restarts = CounterMetricFamily("fleetplane_service_restarts", "Times the supervisor "
                                       "restarted a process (it exited or the broker crashed)",
                                       labels=["service"])
        up = GaugeMetricFamily("fleetplane_service_up", "1 while the process runs",
                               labels=["service"])
        processes = dict(state.get("services") or {})
        if state.get("broker"):
            processes["broker"] = state["broker"]
        for name, info in sorted(processes.items()):
            restarts.add_metric([name], info.get("restarts", 0))
            up.add_metric([name], int(self.alive(name)))
        yield restarts
        yield up
