"""fleetplane-router: composition root."""

from __future__ import annotations

from functools import partial

from fleetplane.core.catalog import load_catalog
from fleetplane.core.loop import Processor
from fleetplane.core.service import bootstrap
from fleetplane.core.topics import ACCEPTED
from fleetplane.router.handlers import route


def main() -> None:
    settings = bootstrap("router")
    catalog = load_catalog(settings.catalog_file)
    processor = Processor("router", [ACCEPTED], partial(route, catalog), settings)
    processor.install_signal_handlers()
    processor.run()


if __name__ == "__main__":
    main()
