"""Accounting's loop: the shared Processor (consumer group, static membership, checkpoints,
signals, idle backoff, at-least-once offsets) with its own batch step.

`Processor._process` decodes each record into a validated event and calls the handler once per
record. Accounting's handler only turns events into rows, so here a whole consumed batch goes
through columnar.build (raw bytes -> Avro field dicts (core.serde) -> row tuples by table, no
pydantic event, no `Record` per record) and into the sink in one call. Records the fast path leaves
(dead letters, undecodable records, an unstorable batch) go through the usual per-record path
(`_handle_one`: decode, handler, dead letter on failure), unchanged.

Hooks that need an event (the fleet metrics' `observe`, the trace-id recorder's `note`, and the
loop's instruments for a record that carries a trace context, so accounting has its span in the
task's trace) get one built without validation (`model_construct`) from the decoded fields, only
when they are set.
The loop's per-event handle-time metric (Instruments.handle) is not observed on the fast path;
the records-consumed counter is.

Checkpoints: every `commit_interval_s`, not when the inputs are drained (a sink prefers few large
inserts: at a trickle, a checkpoint per drained poll would insert a few rows per table 50 times a
second), except right after a backlog: a drained poll within `commit_interval_s` of handling a
full batch checkpoints at once, so the rows of a backlog's last, partial batch are stored
without waiting out the interval (docs/accounting.md, "Sink, eleventh round"). Only a full
batch opens that window, so a trickle keeps the interval. A checkpoint hands the sink's rows to
its insert thread and stores offsets only up to the lowest record not yet inserted (the sink is
a core.loop.PipelinedSink): it does not wait for the insert.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import Message

from fleetplane.accounting.columnar import build, messages_of
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.core.events import EVENT_TYPES, Event
from fleetplane.core.loop import NO_INSTRUMENTS, Processor, Record, headers_dict
from fleetplane.core.service import collector_paused

Note = Callable[[Event, Record], None]
#: a batch's stored records as (event type, fields): metrics.fleet.FleetMetrics.observe_batch
ObserveBatch = Callable[[Sequence[tuple[str, Mapping[str, Any]]]], None]
#: a handled batch smaller than this is a trickle (BatchProcessor._probe_at_once)
PACE_BELOW = 1_000
TRACEPARENT = "traceparent"  # fleetplane.tracing.propagation's header (not imported: OTel)


def record_of(msg: Message) -> Record:
    ts_type, ts = msg.timestamp()
    return Record(topic=msg.topic() or "", partition=msg.partition() or 0,
                  offset=msg.offset() or 0, key=msg.key(), value=msg.value() or b"",
                  headers=headers_dict(msg.headers()), timestamp_ms=ts if ts_type else 0)


class BatchProcessor(Processor):
    """A Processor whose batch step writes rows straight into `columnar_sink` (module doc)."""

    def __init__(self, *args: Any, columnar_sink: ClickHouseSink,
                 observe_batch: ObserveBatch | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.columnar_sink = columnar_sink
        #: sees every stored record of a batch as (event type, fields) (the fleet metrics)
        self.observe_batch = observe_batch
        #: called with each stored event and its record when it carries headers (trace ids)
        self.note: Note | None = None
        self._topic_records: dict[str, Record] = {}
        #: when the last full batch was handled (time.monotonic; the module doc's checkpoints)
        self._full_at = -1e9
        #: the batch before was a small one (_probe_at_once)
        self._small_before = False

    def _process(self, msgs: list[Message]) -> None:
        # the batch's decoded records and rows hold no reference cycles: the collector waits
        # (core.service.collector_paused; docs/accounting.md, "Sink, sixteenth round")
        with collector_paused():
            self._process_batch(msgs)

    def _process_batch(self, msgs: list[Message]) -> None:
        assert self.producer is not None
        self._small_before = len(msgs) < PACE_BELOW
        messages = messages_of(msgs)
        if not messages:
            return
        traced = self.instruments is not NO_INSTRUMENTS and _any_traced(messages)
        hooks = self.observe_batch is not None or self.note is not None or traced
        batch = build(messages, self.serde, keep_events=hooks)
        self._count(batch.per_topic)
        self.columnar_sink.add_batch(batch.rows, batch.offsets)
        if hooks:
            self._hooks(batch.events, batch.messages)
        for msg in batch.slow:   # the usual path: handler, or a dead letter
            for out in self._handle_one(record_of(msg)):
                self._produce(out)
        pending = self._pending
        for key, (_low, high) in batch.offsets.items():
            if pending.get(key, -1) < high + 1:
                pending[key] = high + 1
        for msg in batch.slow:
            key = (msg.topic() or "", msg.partition() or 0)
            offset = (msg.offset() or 0) + 1
            if pending.get(key, -1) < offset:
                pending[key] = offset
        self.processed += len(messages)
        self.producer.poll(0)

    def _probe_at_once(self, msgs: list[Message]) -> bool:
        """Two batches in a row of fewer than PACE_BELOW records are a trickle: the next look
        at the inputs waits the sink's probe interval (settings.sink_probe_s), so a steady
        stream comes in batches of that interval's records instead of a probe of every
        partition per few records. A larger batch, or a first small one (a backlog's first
        fetches return a few records per partition), says look again at once."""
        return not (len(msgs) < PACE_BELOW and self._small_before)

    def _drained(self, msgs: list[Message]) -> bool:
        """Checkpoint now when the inputs ran dry within a commit interval after a full
        batch (a backlog just caught up with); otherwise at the interval (module doc)."""
        now = time.monotonic()
        if len(msgs) >= self.settings.batch_size:
            self._full_at = now
            return False
        return now - self._full_at < self.commit_interval_s

    def _count(self, per_topic: dict[str, int]) -> None:
        """The records-consumed metric (Instruments.consumed counts records per topic)."""
        records: list[Record] = []
        for topic, n in per_topic.items():
            proto = self._topic_records.get(topic)
            if proto is None:
                proto = self._topic_records[topic] = Record(topic, 0, 0, None, b"")
            records.extend([proto] * n)
        self.instruments.consumed(records)

    def _hooks(self, events: list[tuple[str, dict[str, Any]]], messages: list[Message]
               ) -> None:
        if self.observe_batch is not None:   # from the fields: no event object per record
            self.observe_batch(events)
        if self.note is None and self.instruments is NO_INSTRUMENTS:
            return  # nothing below would use a traced record's event
        for (name, fields), msg in zip(events, messages, strict=True):
            # every record has headers (event_type, ...); only a trace context needs the event:
            # the trace-id recorder (`note`) and accounting's span of the task's trace
            if _traced(msg):
                event = EVENT_TYPES[name].model_construct(**fields)
                rec = record_of(msg)
                if self.note is not None:
                    self.note(event, rec)
                self.instruments.handle(event, rec, list)


def _traced(msg: Message) -> bool:
    """Whether the record carries a trace context."""
    return any(h[0] == TRACEPARENT for h in (msg.headers() or []))


def _any_traced(msgs: list[Message]) -> bool:
    """Whether a record carries a trace context (none do when tracing is off at ingest)."""
    return any(map(_traced, msgs))
