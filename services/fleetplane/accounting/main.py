"""fleetplane-accounting: every topic into ClickHouse, and the analytics API beside it.

At-least-once (``transactional=False``): the sink flushes at each checkpoint before the offsets
are stored; rows are deduplicated by event_id in ClickHouse. Consumed batches go to rows
without an event object per record (batchloop.py, columnar.py). Large consume batches and a
0.5 s checkpoint interval keep inserts big (ClickHouse prefers few large inserts).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib
import os
import socket
import sys
import threading
import time
from typing import Any

import uvicorn

from fleetplane.accounting.api import create_app
from fleetplane.accounting.batchloop import BatchProcessor
from fleetplane.accounting.handlers import make_handler
from fleetplane.accounting.publisher import Publisher, run_in_thread
from fleetplane.accounting.schema import apply_settings_ddl
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.accounting.store import Store, connect
from fleetplane.core.errors import Fatal
from fleetplane.core.kafka import EventProducer
from fleetplane.core.logging import get_logger
from fleetplane.core.service import bootstrap, freeze_startup_heap, serve_http_in_thread
from fleetplane.core.settings import Settings
from fleetplane.core.teams import teams_for
from fleetplane.core.topics import event_topics, load_topics
from fleetplane.metrics.fleet import FleetMetrics
from fleetplane.metrics.http import mount_metrics
from fleetplane.metrics.lag import ConsumerLag
from fleetplane.metrics.setup import instrument
from fleetplane.tracing.records import TraceIds, mount_traces

log = get_logger(__name__)

SERVICE = "accounting"
GROUP_ID = "fleetplane-accounting"
COMMIT_INTERVAL_S = 0.5
MIN_BATCH_SIZE = 20_000
#: librdkafka's prefetch, per partition (docs/accounting.md, "Sink, seventh round"): stop
#: fetching a partition once this many of its records wait locally (the default, 100,000,
#: keeps fetching; the embedded broker answers at once, so the fetchers spun on half a core
#: while the loop worked through what they had fetched), and look again after a short backoff
#: (librdkafka's default, 1 s, would stall a partition the loop has drained).
CONSUMER_TUNING: dict[str, str] = {"queued.min.messages": "2000",
                                   "fetch.queue.backoff.ms": "50"}


def all_topics(settings: Settings) -> list[str]:
    """Every event topic of infra/topics.yaml (internal changelog topics excluded)."""
    return event_topics(load_topics(settings.topics_file))


def consumer_tuning(settings: Settings) -> dict[str, str]:
    """The consumer settings of `settings` with CONSUMER_TUNING where the operator set none."""
    given = {**settings.kafka_config, **settings.kafka_consumer_config}
    return {**{k: v for k, v in CONSUMER_TUNING.items() if k not in given},
            **settings.kafka_consumer_config}


def default_instance_id(settings: Settings, group_id: str) -> str:
    """Stable across restarts: one accounting per host and ClickHouse target (chdb allows one
    process per directory anyway); it is also the consumer's group.instance.id."""
    target = hashlib.sha1(settings.resolved_clickhouse_dsn().encode()).hexdigest()[:10]
    return f"{group_id}-{socket.gethostname()}-{target}"


def build_processor(settings: Settings, store: Store, *, group_id: str = GROUP_ID,
                    commit_interval_s: float = COMMIT_INTERVAL_S,
                    instance_id: str | None = None,
                    fleet: FleetMetrics | None = None
                    ) -> tuple[BatchProcessor, ClickHouseSink]:
    """The accounting Processor over every topic, at-least-once, with its ClickHouse sink;
    `fleet` (the fleet metrics) sees every stored event: a batch's records as their fields
    (observe_batch), the records of the per-record path as events (observe)."""
    sink = ClickHouseSink(store, flush_rows=settings.sink_flush_rows, group=group_id,
                          background=settings.sink_background_inserts)
    # clickhouse-connect imports pandas at the first insert (about 1 s): do it before the loop
    with contextlib.suppress(ImportError):
        importlib.import_module("pandas")
    tuned = settings.model_copy(update={"batch_size": max(settings.batch_size, MIN_BATCH_SIZE),
                                        "idle_probe_s": settings.sink_probe_s,
                                        # a parked poll waits at most this: the probe interval
                                        "poll_timeout_s": max(settings.poll_timeout_s,
                                                              settings.sink_probe_s),
                                        "kafka_consumer_config": consumer_tuning(settings)})
    handler = make_handler(sink, fleet.observe if fleet is not None else None)
    processor = BatchProcessor(SERVICE, all_topics(settings), handler, tuned,
                               group_id=group_id, sink=sink,
                               commit_interval_s=commit_interval_s, commit_when_drained=False,
                               transactional=False,
                               # rows past our offsets may have been stored by an earlier process
                               on_assign=lambda _consumer, _parts: sink.reassigned(),
                               instance_id=instance_id or default_instance_id(settings, group_id),
                               columnar_sink=sink,
                               observe_batch=fleet.observe_batch if fleet is not None else None)
    return processor, sink


def status_of(processor: BatchProcessor, sink: ClickHouseSink) -> dict[str, Any]:
    return {
        "processed": processor.processed,
        "rows_written": sink.stats.rows,
        "rows_pending": sink.pending,
        "insert_failures": sink.stats.failures,
    }


def wait_started(server: uvicorn.Server, timeout_s: float = 10.0) -> bool:
    """True once uvicorn listens; False when it gave up (e.g. the port is taken) or timed out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.started:
            return True
        if not any(t.name == "http" and t.is_alive() for t in threading.enumerate()):
            return False
        time.sleep(0.05)
    return False


def run(settings: Settings) -> int:
    """Run the service until SIGTERM/SIGINT; returns the process exit code."""
    store = connect(settings)
    instrument(settings, SERVICE)  # loop metrics (on /metrics) and traces
    try:
        apply_settings_ddl(store, settings)
        teams = teams_for(settings.teams_file)
        fleet = FleetMetrics(quota=lambda team: teams.policy(team).max_running)
        lag = ConsumerLag(settings.client_config(), groups=[GROUP_ID])
        fleet.registry.register(lag)
        processor, sink = build_processor(settings, store, fleet=fleet)
        # the sink's batches set off collections of the oldest generation, each scanning the
        # whole start-up heap with the GIL held (docs/accounting.md, "Sink, eleventh round")
        log.info("start-up heap frozen", objects=freeze_startup_heap())
        # each task's trace id (traceparent headers), for `fleetplane describe`
        traces = TraceIds(store, settings.clickhouse_ttl_days)
        processor.handler = traces.wrap(processor.handler)   # records of the usual path
        processor.note = traces.note                          # records of the fast path
        processor.sink = traces.beside(sink)
        producer = EventProducer(settings)
        publisher = Publisher(store, settings, producer.send)
        stop_publisher = threading.Event()
        app = create_app(store, status=lambda: {**status_of(processor, sink),
                                                "budgets_published": publisher.published_budgets,
                                                "alerts_published": publisher.published_alerts},
                         settings=settings)
        mount_metrics(app, fleet.registry)  # GET /metrics (docs/operations.md, "Metrics")
        mount_traces(app, traces)  # GET /v1/tasks/{id}/trace
        server = serve_http_in_thread(app, settings.bind_host, settings.accounting_port)
        if not wait_started(server):
            log.error("accounting API did not start", host=settings.bind_host,
                      port=settings.accounting_port)
            return 2
        processor.install_signal_handlers()
        publisher_thread = run_in_thread(publisher, stop_publisher)
        code = 0
        try:
            processor.run()
        except Fatal:
            log.error("accounting stopped on a fatal error", exc_info=True)
            code = 1
        finally:
            server.stop()
            stop_publisher.set()
            publisher_thread.join(10)
            producer.close()
            lag.close()
            sink.close()
        log.info("accounting stopped", **status_of(processor, sink))
        return code
    finally:
        store.close()


def main() -> None:
    settings = bootstrap(SERVICE)
    code = run(settings)
    # Everything is committed and the ClickHouse connection closed by now. The exit hooks run
    # (the tracer's last spans, chdb's own hook), the rest of the interpreter's teardown is
    # skipped: chdb's static destructors can run while its worker threads are still alive
    # and end the process with SIGSEGV (chdb-io/chdb-core#177, "residual interpreter-exit
    # SIGSEGV"; seen once here: `test_services_stop_cleanly_on_sigterm`, accounting exited
    # with -11 after "accounting stopped", stop 23).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
