"""fleetplane-ingest: composition root (HTTP API + the raw-submission validator loop).

Start-up order: read the tokens and idempotency marks (compacted topics) to their end, then serve
HTTP and validate raw submissions."""

from __future__ import annotations

from functools import partial

from fleetplane.core import doorbell
from fleetplane.core.kafka import EventProducer
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import Processor
from fleetplane.core.service import bootstrap, freeze_startup_heap, serve_http_in_thread
from fleetplane.core.teams import teams_for
from fleetplane.core.topics import SUBMITTED
from fleetplane.executor.workspace import load_repositories
from fleetplane.ingest.api import Intake, create_app
from fleetplane.ingest.handlers import accept
from fleetplane.ingest.idempotency import IDEMPOTENCY_TOPIC, MarkingHandler, Marks
from fleetplane.ingest.kvtopic import TopicTable, TopicWriter
from fleetplane.ingest.names import NAMES_TOPIC, NameIndex
from fleetplane.ingest.repositories import REPOSITORIES_TOPIC, RepositoryRegistry
from fleetplane.ingest.taskview import TaskView
from fleetplane.ingest.tokens import TOKENS_TOPIC, TokenStore
from fleetplane.ingest.workers import Workers, die_with_parent, rate_share
from fleetplane.metrics.setup import instrument
from fleetplane.tracing.http import instrument_app

log = get_logger(__name__)


def main() -> None:
    settings = bootstrap("ingest")
    # worker 0 starts the others (FLEETPLANE_INGEST_WORKERS), each a replica on the same port
    workers = Workers(settings) if settings.ingest_worker_index == 0 else None
    if workers is None:
        die_with_parent()
    # loop metrics on /metrics; traces start here (an incoming traceparent is honoured)
    obs = instrument(settings, "ingest", entry=True)
    tokens = TokenStore()
    marks = Marks(settings.idempotency_window_s)
    repositories = RepositoryRegistry(load_repositories(settings))
    names = NameIndex(settings.names_window_s)
    tables = TopicTable(settings, {TOKENS_TOPIC: tokens.apply, IDEMPOTENCY_TOPIC: marks.apply,
                                   REPOSITORIES_TOPIC: repositories.apply,
                                   NAMES_TOPIC: names.apply})
    tables.start()
    # the API's producer hands tasks off to the ingest loop: 1 ms of linger (5 ms is every
    # other producer's) still batches concurrent requests and adds 4 ms less per submission
    producer = EventProducer(settings.model_copy(update={
        "kafka_config": {"linger.ms": "1", **settings.kafka_config}}))
    writer = TopicWriter(settings)
    view = TaskView(settings.resolved_accounting_url())
    intake = Intake(producer=producer, tokens=tokens, marks=marks,
                    teams=teams_for(settings.teams_file), view=view,
                    repositories=repositories, writer=writer, names=names,
                    max_request_bytes=settings.max_request_bytes,
                    auth_failures_per_minute=settings.auth_failures_per_minute,
                    auth_failure_burst=settings.auth_failure_burst,
                    rate_share=rate_share(settings),
                    on_published=(partial(doorbell.ring, settings.kafka_bootstrap, [SUBMITTED])
                                  if settings.handoff_doorbell else None))
    app = create_app(intake)
    if obs.tracing is not None:
        instrument_app(app, obs.tracing)
    server = serve_http_in_thread(app, settings.bind_host, settings.ingest_port,
                                  trusted_proxies=settings.trusted_proxies,
                                  reuse_port=settings.ingest_workers > 1)
    if workers is not None:
        workers.start()
    processor = Processor("ingest", [SUBMITTED], MarkingHandler(
        partial(accept, known_repository=repositories.known, names=names), marks, names),
        settings, quiet_probe_s=settings.ingest_quiet_probe_s,
        unannounced_window_s=settings.ingest_unannounced_window_s)
    processor.install_signal_handlers()
    # later collections do not scan the start-up heap (core.service.freeze_startup_heap)
    log.info("start-up heap frozen", objects=freeze_startup_heap())
    try:
        processor.run()
    finally:
        if workers is not None:
            workers.stop()
        server.stop()
        tables.stop()
        writer.close()
        producer.close()
        view.close()


if __name__ == "__main__":
    main()
