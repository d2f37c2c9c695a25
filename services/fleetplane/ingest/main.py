"""fleetplane-ingest: composition root (HTTP API + the raw-submission validator loop)."""

from __future__ import annotations

from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import Processor
from fleetplane.core.service import bootstrap, serve_http_in_thread
from fleetplane.core.topics import SUBMITTED
from fleetplane.ingest.api import create_app
from fleetplane.ingest.handlers import accept


def main() -> None:
    settings = bootstrap("ingest")
    producer = EventProducer(settings)
    server = serve_http_in_thread(create_app(producer), settings.bind_host, settings.ingest_port)
    processor = Processor("ingest", [SUBMITTED], accept, settings)
    processor.install_signal_handlers()
    try:
        processor.run()
    finally:
        server.should_exit = True
        producer.close()


if __name__ == "__main__":
    main()
