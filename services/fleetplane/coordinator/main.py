"""Entry point ``fleetplane-coordinator``: create the topics, then run the Faust worker.

No command-line arguments: everything comes from FLEETPLANE_* settings. SIGTERM and SIGINT stop
the worker cleanly: the agent finishes its record, the producer is flushed, offsets are
committed, and the worker leaves the consumer group (exit status 0).
"""

from __future__ import annotations

from typing import Any

import faust

from fleetplane.coordinator.app import Coordinator, group_instance_id
from fleetplane.coordinator.workarounds import leave_group_on_close
from fleetplane.core.logging import get_logger
from fleetplane.core.service import bootstrap

log = get_logger(__name__)


class CoordinatorWorker(faust.Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spinner = None  # no terminal spinner escapes in a service's log

    async def on_stop(self) -> None:
        # runs before the app (and its consumer) stops: see coordinator.workarounds
        leave_group_on_close(self.app)
        await super().on_stop()


def main() -> None:
    settings = bootstrap("coordinator")
    coordinator = Coordinator(settings)
    worker = CoordinatorWorker(
        coordinator.app,
        loglevel=settings.log_level,
        quiet=True,  # no startup banner on stdout
        override_logging=False,  # keep core.logging's configuration (structured, stderr)
        redirect_stdouts=False,
    )
    log.info("coordinator worker starting", group_instance_id=group_instance_id(settings),
             web=f"{settings.bind_host}:{settings.coordinator_web_port}")
    worker.execute_from_commandline()  # returns only by SystemExit (0 after SIGTERM)


if __name__ == "__main__":
    main()
