"""Faust wiring: one agent over the coordinator's input topics, one table of task states.

Every input topic is keyed by task id and has as many partitions as the table's changelog, so
the record for task T arrives on partition p of whichever topic, and T's row lives in partition
p of the table (Faust writes a row to the changelog partition of the event being processed).

Per record (``Coordinator.process``): decode the Avro bytes (undecodable -> fleet.dlq), read
the task's row, ``decide``, publish the decided events and wait for the broker's
acknowledgement, then write the row. A crash before the row is written redelivers the input
(its offset is not committed: Faust commits an offset only after the record was processed and
the producer flushed), and ``decide`` derives the same events with the same event ids from the
old row; a crash after it finds the row and ignores the input. So nothing is lost, and the one
possible duplicate (published, row not yet written) carries the event id of the original.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from faust.streams import _current_event  # private: which input a table write belongs to
from faust.types import EventT, RecordMetadata, StreamT, TopicT

from fleetplane.coordinator.handlers import decide
from fleetplane.coordinator.partitioning import partition_for
from fleetplane.coordinator.state import TaskState
from fleetplane.coordinator.workarounds import (
    FetchGate,
    StallWatchdog,
    install_idle_fetch_backoff,
)
from fleetplane.core import topics as t
from fleetplane.core.events import Event
from fleetplane.core.kafka import event_headers
from fleetplane.core.logging import get_logger, task_context
from fleetplane.core.loop import Record, dead_letter, headers_dict
from fleetplane.core.serde import DecodeError, Serde, default_serde
from fleetplane.core.settings import Settings

SERVICE = "coordinator"
APP_ID = "fleetplane-coordinator"
TABLE = "tasks"
CHANGELOG = f"{APP_ID}-{TABLE}-changelog"
INPUTS = (t.ROUTED, t.LIFECYCLE, t.OUTCOMES, t.CONTROL)
PARTITIONS = 6
BATCH_MAX = 500  # records decided together, with one acknowledgement wait
BATCH_WITHIN_S = 0.01  # how long a partial batch waits for more records

log = get_logger(__name__)


@dataclass
class Stats:
    """Counters (exposed in logs and on the web endpoint /coordinator/stats/)."""

    started_at: float = field(default_factory=time.monotonic)
    processed: int = 0
    published: int = 0
    dead_letters: int = 0
    ready_s: float | None = None  # process start -> table recovered, inputs flowing
    recovery_s: float | None = None  # partitions assigned -> table recovered, inputs flowing
    recovered_rows: int | None = None
    assigned_at: float | None = None
    reseeks: int = 0  # stalled partitions sought back (coordinator.workarounds)


def group_instance_id(settings: Settings) -> str:
    """Static group membership id: stable across restarts of one replica, unique among live
    replicas (``FLEETPLANE_INSTANCE_ID``). See coordinator.workarounds for why it is static."""
    return f"{APP_ID}-{settings.instance_id}"


def faust_settings(settings: Settings) -> dict[str, Any]:
    """The faust.App configuration (timeouts tuned for a fast start and rebalance)."""
    session_s = settings.session_timeout_ms / 1000  # 10 s; 3 s on tansu (its join takes ~s/2)
    return {
        "broker": f"kafka://{settings.kafka_bootstrap}",
        "broker_client_id": APP_ID,
        "store": "memory://",  # tables are rebuilt from their changelog topics at start
        "datadir": str(settings.resolved_data_dir() / SERVICE),
        "autodiscover": False,
        "topic_partitions": PARTITIONS,
        "topic_replication_factor": 1,
        "topic_allow_declare": False,  # core.topics.ensure_topics creates every topic
        "topic_disable_leader": True,  # no leader election needed (saves a 1-partition topic)
        "processing_guarantee": "at_least_once",  # exactly_once: see docs/coordinator.md
        "consumer_auto_offset_reset": "earliest",
        "consumer_group_instance_id": group_instance_id(settings),
        "broker_session_timeout": session_s,
        "broker_heartbeat_interval": max(0.5, session_s / 5),
        "broker_rebalance_timeout": session_s,
        "broker_request_timeout": 30.0,
        "broker_commit_interval": 0.5,
        "broker_commit_every": 1000,
        "stream_recovery_delay": 0.0,
        "table_standby_replicas": 0,
        "web_enabled": True,
        "web_bind": settings.bind_host,
        "web_host": settings.bind_host,
        "web_port": settings.coordinator_web_port,
        "web_in_thread": False,
    }


class Coordinator:
    """The faust.App, its table and agent, and the per-record processing."""

    def __init__(self, settings: Settings, *, serde: Serde | None = None) -> None:
        self.settings = settings
        self.serde = serde or default_serde()
        self.stats = Stats()
        conf = faust_settings(settings)
        Path(conf["datadir"]).mkdir(parents=True, exist_ok=True)  # faust creates one level only
        self.app = faust.App(APP_ID, **conf)
        # key_type/value_type bytes: the "raw" codec both ways (rows are TaskState JSON)
        self.table = self.app.Table(TABLE, default=None, partitions=PARTITIONS,
                                    key_type=bytes, value_type=bytes)
        self.inputs = self.app.topic(*INPUTS, key_type=bytes, value_type=bytes,
                                     key_serializer="raw", value_serializer="raw")
        partitions = {s.name: s.partitions for s in t.load_topics(settings.topics_file)}
        self._partitions = partitions
        self._outputs: dict[str, TopicT] = {}
        FetchGate(self.app, on_open=self._on_inputs_flowing).install()
        install_idle_fetch_backoff(settings.idle_fetch_backoff_ms / 1000)
        self.watchdog = StallWatchdog(self.app)
        self.app.timer(1.0, name="coordinator.stall_watchdog")(self._check_stalls)
        self.app.agent(self.inputs, name="coordinate")(self._agent)
        self.app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]

        async def stats(view: Any, request: Any) -> Any:
            return view.json({**self.stats.__dict__, "rows": len(self.table)})

        async def healthz(view: Any, request: Any) -> Any:
            ready = self.stats.ready_s is not None
            return view.json({"ready": ready, "service": SERVICE}, status=200 if ready else 503)

        self.app.page("/coordinator/stats/")(stats)
        self.app.page("/healthz")(healthz)

    # -- agent -----------------------------------------------------------------------------
    async def _agent(self, stream: StreamT[bytes]) -> None:
        batches = stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S)  # type: ignore[attr-defined]
        async for events in batches:
            await self.process_batch(events)

    async def process(self, event: EventT[bytes]) -> None:
        """Apply one input record (a batch of one)."""
        await self.process_batch([event])

    async def process_batch(self, events: Sequence[EventT[bytes]]) -> None:
        """Apply a batch of input records (called inside the agent's ``async for``).

        Decisions are taken in order, each seeing the rows the earlier ones changed; then every
        output is published and acknowledged at once, and only then are the changed rows written
        (effects first, then the row that records them: a crash in between re-derives the same
        events, with the same event ids, from the old row when the inputs are redelivered). One
        acknowledgement wait per batch instead of per record is what makes the agent fast."""
        rows: dict[bytes, tuple[TaskState, EventT[bytes]]] = {}
        outputs: list[Event] = []
        for event in events:
            outputs.extend(self._decide_one(event, rows))
        if outputs:
            await self._publish_acked(outputs)
        for key, (state, source) in rows.items():
            # the changelog partition is the partition of the input that changed the row
            # (co-partitioned); Faust reads it from the current event
            _current_event.set(weakref.ref(source))
            self.table[key] = state.to_bytes()

    def _decide_one(self, event: EventT[bytes],
                    rows: dict[bytes, tuple[TaskState, EventT[bytes]]]) -> list[Event]:
        msg = event.message
        self.watchdog.saw(msg.tp)
        key: bytes = msg.key or b""
        value: bytes = msg.value or b""
        self.stats.processed += 1
        try:
            decoded = self.serde.decode(value)
            if decoded.task_id.encode() != key:
                raise DecodeError(f"record key {key!r} is not the task id {decoded.task_id!r}")
        except DecodeError as exc:
            log.warning("undecodable record to DLQ", topic=msg.topic, offset=msg.offset,
                        reason=str(exc))
            self.stats.dead_letters += 1
            return [dead_letter(SERVICE, _record_of(msg), exc)]
        with task_context(decoded.task_id, event_type=type(decoded).__name__):
            if key in rows:
                state: TaskState | None = rows[key][0]
            else:
                raw = self.table.get(key)
                state = TaskState.from_bytes(raw) if raw is not None else None
            try:
                new, outputs = decide(state, decoded)
            except Exception as exc:  # a bug for one task must not stop the others
                log.exception("decide failed, record to DLQ")
                self.stats.dead_letters += 1
                return [dead_letter(SERVICE, _record_of(msg), exc)]
            if outputs:
                log.debug("decided", status=new.status if new else None,
                          emitted=[type(o).__name__ for o in outputs])
            if new is not None and new is not state:
                rows[key] = (new, event)
            return outputs

    # -- output ----------------------------------------------------------------------------
    def _topic(self, name: str) -> TopicT:
        topic = self._outputs.get(name)
        if topic is None:
            topic = self.app.topic(name, key_type=bytes, value_type=bytes,
                                   key_serializer="raw", value_serializer="raw")
            self._outputs[name] = topic
        return topic

    async def _send(self, event: Event) -> Awaitable[RecordMetadata]:
        name = t.topic_for(event)
        key = t.key_for(event)
        pending = await self._topic(name).send(
            key=key, value=self.serde.encode(event),
            partition=partition_for(key, self._partitions.get(name, PARTITIONS)),
            headers=_bytes_headers(event_headers(event)), force=True)
        self.stats.published += 1
        return pending

    async def _publish_acked(self, events: list[Event]) -> None:
        """Publish and wait until the broker acknowledged every event (acks=all)."""
        pending = [await self._send(e) for e in events]
        await asyncio.gather(*pending)

    # -- lifecycle signals -------------------------------------------------------------------
    async def _check_stalls(self) -> None:
        await self.watchdog.check()
        self.stats.reseeks = self.watchdog.reseeks

    async def _on_assigned(self, sender: Any, assigned: Any, **_: Any) -> None:
        self.stats.assigned_at = time.monotonic()
        log.info("partitions assigned", count=len(assigned))

    async def _on_inputs_flowing(self) -> None:
        """After each rebalance: the table is recovered and the input partitions resumed."""
        now = time.monotonic()
        if self.stats.ready_s is None:
            self.stats.ready_s = round(now - self.stats.started_at, 3)
        if self.stats.assigned_at is not None:
            self.stats.recovery_s = round(now - self.stats.assigned_at, 3)
        self.stats.recovered_rows = len(self.table)
        log.info("table ready", rows=self.stats.recovered_rows, recovery_s=self.stats.recovery_s,
                 ready_s=self.stats.ready_s)


def _record_of(msg: Any) -> Record:
    return Record(topic=msg.topic, partition=msg.partition, offset=msg.offset, key=msg.key,
                  value=msg.value or b"", headers=headers_dict(msg.headers),
                  timestamp_ms=int((msg.timestamp or 0) * 1000))


def _bytes_headers(headers: list[tuple[str, str | bytes | None]]) -> list[tuple[str, bytes]]:
    return [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in headers]


