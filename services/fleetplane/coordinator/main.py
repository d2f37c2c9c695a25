"""Entry point ``fleetplane-coordinator``: create the topics, then run as a standby until the
active coordinator goes quiet, then as the active one (fleetplane.coordinator.app).

No command-line arguments: everything comes from FLEETPLANE_* settings. SIGTERM and SIGINT stop
the process cleanly: each step finishes its batch and commits its transaction (exit status 0).
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from types import FrameType

from fleetplane.coordinator.app import Coordinator
from fleetplane.core.logging import get_logger
from fleetplane.core.service import bootstrap, freeze_startup_heap
from fleetplane.metrics.coordinator import Decisions, Queue
from fleetplane.metrics.setup import instrument

log = get_logger(__name__)


def main() -> None:
    settings = bootstrap("coordinator")
    obs = instrument(settings, "coordinator")  # metrics and traces (docs/operations.md)
    coordinator = Coordinator(settings)
    decisions = Decisions(obs.registry)
    obs.on_input(decisions.routed)
    obs.on_publish(decisions.published)
    obs.registry.register(Queue(coordinator.fleet_view, coordinator.held_tasks))
    obs.serve(settings.coordinator_metrics_port)
    # a transactional call that hangs ends the process (core.loop.Processor._guard)
    coordinator.repartitioner.exit_on_hang = True
    coordinator.schedule.exit_on_hang = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal received, stopping", signal=signum)
        coordinator.stop()

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack on stderr
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR2, coordinator.take_over_now)  # a planned failover (standby)
    log.info("coordinator starting", instance=settings.instance_id,
             web=f"{settings.bind_host}:{settings.coordinator_web_port}")
    # later collections do not scan the start-up heap (core.service.freeze_startup_heap)
    log.info("start-up heap frozen", objects=freeze_startup_heap())
    sys.exit(coordinator.run())


if __name__ == "__main__":
    main()
