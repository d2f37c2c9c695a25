"""fleetplane-executor: composition root."""

from __future__ import annotations

import os
import socket
from functools import partial

from fleetplane.core.catalog import load_catalog
from fleetplane.core.loop import Processor
from fleetplane.core.service import bootstrap
from fleetplane.core.topics import DISPATCH
from fleetplane.executor.handlers import SeenDispatches, execute
from fleetplane.executor.models import ModelClients


def main() -> None:
    settings = bootstrap("executor")
    catalog = load_catalog(settings.catalog_file)
    executor_id = settings.executor_id or f"{socket.gethostname()}-{os.getpid()}"
    handler = partial(execute, catalog, ModelClients(settings), executor_id, SeenDispatches())
    processor = Processor("executor", [DISPATCH], handler, settings,
                          concurrency=settings.executor_slots)
    processor.install_signal_handlers()
    processor.run()


if __name__ == "__main__":
    main()
