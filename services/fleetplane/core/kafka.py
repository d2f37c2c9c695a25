"""Thin typed wrappers over confluent-kafka: an event producer for request/response paths."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from fleetplane.core import doorbell
from fleetplane.core.errors import Retriable
from fleetplane.core.events import Event
from fleetplane.core.logging import get_logger
from fleetplane.core.serde import Serde, default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import key_for, topic_for

log = get_logger(__name__)

#: Called for every event a process publishes, with the headers it adds (tracing's traceparent;
#: metrics that count what a service publishes return none). Installed by a service's
#: composition root (fleetplane.metrics.setup); none by default.
PublishHook = Callable[[Event], Iterable[tuple[str, bytes]]]
_publish_hooks: list[PublishHook] = []


def add_publish_hook(hook: PublishHook) -> None:
    _publish_hooks.append(hook)


def remove_publish_hook(hook: PublishHook) -> None:
    if hook in _publish_hooks:
        _publish_hooks.remove(hook)


#: on a record the reconciler re-published because its hop never answered it (value: the
#: re-drive's number); a hop may answer it again where it would drop a plain duplicate
REDRIVE_HEADER = "fleetplane-redrive"


def event_headers(event: Event) -> list[tuple[str, str | bytes | None]]:
    headers: list[tuple[str, str | bytes | None]] = [
        ("event_type", type(event).__name__.encode()),
        ("content-type", b"avro/binary"),
        ("team", event.team.encode()),
    ]
    for hook in _publish_hooks:
        headers.extend(hook(event))
    return headers


#: how long a replaced client gets to report its purged records to their callbacks
PURGE_SERVE_S = 10.0


def _fatal(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return isinstance(err, KafkaError) and (err.fatal() or err.code() == KafkaError._FATAL)


class RenewingProducer:
    """An idempotent (not transactional) producer that replaces its client after a fatal error.

    A broker restart while records are in flight can end an idempotent producer for good: the
    broker comes back without the last sequence numbers it had acknowledged, answers
    OUT_OF_ORDER_SEQUENCE_NUMBER, and librdkafka raises that as a fatal error (from poll(), and
    _FATAL from every produce() after it). Measured on the embedded broker: 2 of 3 clean
    restarts under a steady produce. The chaos run's executor kept its dead live channel: every
    attempt crashed on its first event and its dispatches went to the dead-letter topic.

    Here a fatal error replaces the client with a new one (a new producer id, sequences from
    0); what the old one had not delivered is purged, so its delivery callbacks report a
    failure and the caller decides (ingest answers 503 and the client retries with its
    idempotency key; the executor puts the events into the outcome's transaction). Consumers
    deduplicate by event id, so an event the old client did deliver costs nothing twice.
    `produce`, `poll` and `flush` are confluent-kafka's; `renewals` counts replacements."""

    def __init__(self, config: dict[str, Any],
                 on_error: Callable[[KafkaError], None] | None = None) -> None:
        self._config = {k: v for k, v in config.items() if k != "error_cb"}
        self._on_error = on_error
        self._lock = threading.Lock()
        self._failed: Producer | None = None  # a client that reported a fatal error
        self.renewals = 0
        self._producer = self._new()

    def _new(self) -> Producer:
        holder: list[Producer] = []

        def error(err: KafkaError) -> None:
            if err.fatal() and holder:
                self._failed = holder[0]
            if self._on_error is not None:
                self._on_error(err)

        producer = Producer({**self._config, "error_cb": error})
        holder.append(producer)
        return producer

    def _renew(self, failed: Producer, why: str) -> None:
        with self._lock:
            if self._producer is not failed:
                return  # another thread renewed it already
            self._producer = self._new()
            self._failed = None
            self.renewals += 1
        log.warning("producer replaced after a fatal error", error=why, renewals=self.renewals)
        with contextlib.suppress(KafkaException):
            failed.purge(in_queue=True, in_flight=True, blocking=False)
        # serve the purged records' delivery callbacks (not delivered): a fatal client's poll
        # raises its fatal error before it serves them, so poll until its queue is empty
        deadline = time.monotonic() + PURGE_SERVE_S
        while len(failed) and time.monotonic() < deadline:
            with contextlib.suppress(KafkaException):
                failed.poll(0.05)
        if len(failed):
            log.error("records of the replaced producer left without a delivery callback",
                      records=len(failed))

    def produce(self, *args: Any, **kwargs: Any) -> None:
        producer = self._producer
        try:
            producer.produce(*args, **kwargs)
        except KafkaException as exc:
            if not _fatal(exc):
                raise
            self._renew(producer, str(exc))
            self._producer.produce(*args, **kwargs)

    def poll(self, timeout_s: float = 0.0) -> int:
        return self._serve(lambda p: p.poll(timeout_s))

    def connect(self, topics: Iterable[str], timeout_s: float = 10.0) -> None:
        """Connect and fetch the topics' metadata now: the first records of a paced producer
        otherwise wait for both (about 1 s on a loaded machine, bench.pipeline's open loop)."""
        for topic in topics:
            self._producer.list_topics(topic, timeout=timeout_s)

    def flush(self, timeout_s: float = 10.0) -> int:
        return self._serve(lambda p: p.flush(timeout_s))

    def _serve(self, call: Callable[[Producer], int]) -> int:
        """poll or flush: a fatal error raised or reported while serving replaces the client
        (0: the old one's records were purged to their callbacks)."""
        producer = self._producer
        try:
            result = call(producer)
        except KafkaException as exc:
            if not _fatal(exc):
                raise
            self._renew(producer, str(exc))
            return 0
        if self._failed is producer:
            self._renew(producer, "fatal error reported")
        return int(result)


class EventProducer:
    """Publishes events to their topics (idempotent producer, acks=all).

    ``send`` returns once the broker acknowledged every event, so an HTTP handler answers only
    after the event is durable, and then rings the doorbells of the partitions it wrote
    (core.doorbell), as a loop does after its commit: the budget publisher's statuses, the
    CLI's control commands. A background thread serves delivery callbacks."""

    def __init__(self, settings: Settings, serde: Serde | None = None) -> None:
        self._producer = RenewingProducer(settings.producer_config())
        self._bell_cluster = settings.kafka_bootstrap if settings.handoff_doorbell else None
        self._serde = serde or default_serde()
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="producer-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)

    def connect(self, topics: Iterable[str], timeout_s: float = 10.0) -> None:
        """Connect and fetch the topics' metadata before the first record (RenewingProducer)."""
        self._producer.connect(topics, timeout_s)

    def produce(self, event: Event, topic: str | None = None, on_delivery: Any = None) -> None:
        self._producer.produce(
            topic or topic_for(event),
            key=key_for(event),
            value=self._serde.encode(event),
            headers=event_headers(event),
            on_delivery=on_delivery,
        )

    def send(self, events: Iterable[Event], timeout_s: float = 30.0) -> None:
        batch = list(events)
        errors: list[KafkaError] = []
        pending = [len(batch)]
        done = threading.Event()
        lock = threading.Lock()
        written: dict[str, set[int]] = {}

        def delivered(err: KafkaError | None, msg: Message) -> None:
            with lock:
                if err is not None:
                    errors.append(err)
                elif (partition := msg.partition()) is not None:
                    written.setdefault(msg.topic() or "", set()).add(partition)
                pending[0] -= 1
                if pending[0] == 0:
                    done.set()

        if not batch:
            return
        deadline = time.monotonic() + timeout_s
        for event in batch:
            while True:
                try:
                    self.produce(event, on_delivery=delivered)
                    break
                except BufferError:
                    # the local queue is full (queue.buffering.max.messages, default 100,000):
                    # the poller thread serves deliveries, which drains it
                    if time.monotonic() >= deadline:
                        raise Retriable(f"the producer's queue stayed full for {timeout_s}s; "
                                        f"{pending[0]} events not acknowledged") from None
                    time.sleep(0.005)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise Retriable(f"{pending[0]} events not acknowledged within {timeout_s}s")
        if written and self._bell_cluster is not None:
            doorbell.ring(self._bell_cluster, written)
        if errors:
            raise Retriable(f"delivery failed: {errors[0]}")

    async def deliver(self, events: Sequence[Event], timeout_s: float = 10.0) -> list[str | None]:
        """Publish from an asyncio handler without holding a thread per request: every event is
        queued at once (librdkafka batches them with other requests' events, linger.ms), and
        the result is one entry per event, None once the broker acknowledged it, else why not.
        """
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[str | None]] = []

        def settle(fut: asyncio.Future[str | None], why: str | None) -> None:
            if not fut.done():
                fut.set_result(why)

        for event in events:
            fut: asyncio.Future[str | None] = loop.create_future()

            def delivered(err: KafkaError | None, _msg: Message,
                          fut: asyncio.Future[str | None] = fut) -> None:
                loop.call_soon_threadsafe(settle, fut, None if err is None else str(err))

            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    self.produce(event, on_delivery=delivered)
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    if time.monotonic() >= deadline:
                        fut.set_result("the producer's queue stayed full")
                        break
                    await asyncio.sleep(0.005)
            futures.append(fut)
        if not futures:
            return []
        done, _ = await asyncio.wait(futures, timeout=timeout_s)
        return [f.result() if f in done else f"not acknowledged within {timeout_s}s"
                for f in futures]

    def close(self) -> None:
        self._producer.flush(10)
        self._closed.set()
        self._poller.join(2)
