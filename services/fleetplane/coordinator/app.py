"""Faust wiring: a repartition agent, a scheduler agent over one partition, one table.

Admission needs state that spans tasks (leases per repository, running tasks and spend per
team, fair share between teams), so the decisions cannot be taken per task-id partition. The
``repartition`` agent forwards every input record (keyed by task id, 6 partitions; fleet.budget
keyed by team) unchanged onto the internal topic ``fleetplane-coordinator-scheduler`` (one
partition), and the ``schedule`` agent consumes that topic with the ``scheduler`` table (one
partition, co-partitioned with it): one writer sees every task, in one total order that
survives restarts (the topic is the log the decisions are replayed from). See
docs/coordinator.md, "Why one scheduler partition".

Per batch of scheduler records (``Coordinator.process_batch``): decode (undecodable -> fleet.dlq),
``Scheduler.apply`` each event to the in-memory ``World`` (loaded from the table after each
recovery), publish every decided event and wait for the broker's acknowledgement, then write the
changed rows. A crash before the rows are written redelivers the records (offsets are committed
only after processing and a producer flush); the world is reloaded from the old rows and the same
events are derived again with the same event ids.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import yaml
from faust.streams import _current_event  # private: which input a table write belongs to
from faust.types import EventT, RecordMetadata, StreamT, TopicT

from fleetplane.coordinator.partitioning import partition_for
from fleetplane.coordinator.scheduler import TICK, Policy, Scheduler
from fleetplane.coordinator.workarounds import (
    FetchGate,
    StallWatchdog,
    install_idle_fetch_backoff,
)
from fleetplane.coordinator.world import World
from fleetplane.core import events as ev
from fleetplane.core import topics as t
from fleetplane.core.catalog import Catalog, _task_type
from fleetplane.core.events import Event
from fleetplane.core.kafka import event_headers
from fleetplane.core.logging import get_logger, task_context
from fleetplane.core.loop import Record, dead_letter, headers_dict
from fleetplane.core.serde import DecodeError, Serde, default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.teams import load_teams

SERVICE = "coordinator"
APP_ID = "fleetplane-coordinator"
TABLE = "scheduler"
CHANGELOG = f"{APP_ID}-{TABLE}-changelog"
SCHEDULER_TOPIC = f"{APP_ID}-scheduler"
INPUTS = (t.ROUTED, t.LIFECYCLE, t.OUTCOMES, t.CONTROL, t.WORKSPACE, t.BUDGET)
PARTITIONS = 6
SCHEDULER_PARTITIONS = 1
# headers the repartition adds: where the record was read (for dead letters)
SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET = "x-source-topic", "x-source-partition", \
    "x-source-offset"
BATCH_MAX = 500  # records decided together, with one acknowledgement wait
BATCH_WITHIN_S = 0.01  # how long a partial batch waits for more records
DELIVERY_LIMIT_S = 120.0  # how long a batch's outputs are retried before the process exits

log = get_logger(__name__)


@dataclass
class Stats:
    """Counters (exposed in logs and on the web endpoint /coordinator/stats/)."""

    started_at: float = field(default_factory=time.monotonic)
    forwarded: int = 0  # input records repartitioned onto the scheduler topic
    processed: int = 0  # scheduler records decided
    decided_s: float = 0.0  # time spent in Scheduler.apply
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


def tiers_catalog(path: Path) -> Catalog | None:
    """The catalog's tiers and task types only: the coordinator needs no prices (loading them
    would import litellm, seconds of start-up for nothing)."""
    if not path.exists():
        return None
    raw = yaml.safe_load(path.read_text()) or {}
    tiers = [str(x) for x in raw.get("tiers") or []]
    types = {name: _task_type(name, v) for name, v in (raw.get("task_types") or {}).items()}
    return Catalog(tiers=tiers, default_tier=str(raw.get("default_tier", tiers[0] if tiers
                                                                          else "")),
                   models={}, task_types=types)


def policy_for_settings(settings: Settings) -> Policy:
    catalog = tiers_catalog(settings.catalog_file)
    return Policy(teams=load_teams(settings.teams_file), catalog=catalog,
                  max_running=settings.coordinator_max_running,
                  heartbeat_timeout_ms=int(settings.coordinator_heartbeat_timeout_s * 1000),
                  backoff_base_ms=settings.coordinator_backoff_base_ms,
                  backoff_cap_ms=settings.coordinator_backoff_cap_ms)


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
        self.scheduler = Scheduler(policy_for_settings(settings))
        self.world: World | None = None  # loaded from the table after each recovery
        self.table = self.app.Table(TABLE, default=None, partitions=SCHEDULER_PARTITIONS,
                                    key_type=bytes, value_type=bytes)
        self.inputs = self.app.topic(*INPUTS, key_type=bytes, value_type=bytes,
                                     key_serializer="raw", value_serializer="raw")
        self.scheduler_topic = self.app.topic(
            SCHEDULER_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw",
            value_serializer="raw", partitions=SCHEDULER_PARTITIONS)
        partitions = {s.name: s.partitions for s in t.load_topics(settings.topics_file)}
        self._partitions = partitions
        self._outputs: dict[str, TopicT] = {}
        FetchGate(self.app, on_open=self._on_inputs_flowing).install()
        install_idle_fetch_backoff(settings.idle_fetch_backoff_ms / 1000)
        self.watchdog = StallWatchdog(self.app)
        self.app.timer(1.0, name="coordinator.stall_watchdog")(self._check_stalls)
        self.app.timer(settings.coordinator_tick_s, name="coordinator.tick")(self._tick)
        self.app.agent(self.inputs, name="repartition")(self._repartition)
        self.app.agent(self.scheduler_topic, name="schedule")(self._agent)
        self.app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]

        async def stats(view: Any, request: Any) -> Any:
            return view.json({**self.stats.__dict__, "rows": len(self.table)})

        async def held(view: Any, request: Any) -> Any:
            return view.json(self.held_tasks())

        async def fleet(view: Any, request: Any) -> Any:
            return view.json(self.fleet_view())

        async def healthz(view: Any, request: Any) -> Any:
            ready = self.stats.ready_s is not None
            return view.json({"ready": ready, "service": SERVICE}, status=200 if ready else 503)

        self.app.page("/coordinator/stats/")(stats)
        self.app.page("/healthz")(healthz)
        self.app.page("/coordinator/held/")(held)
        self.app.page("/coordinator/fleet/")(fleet)

    # -- agents ----------------------------------------------------------------------------
    async def _repartition(self, stream: StreamT[bytes]) -> None:
        """Forward each input record, bytes and headers unchanged, to the scheduler topic."""
        batches = stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S)  # type: ignore[attr-defined]
        async for events in batches:
            pending = []
            for event in events:
                msg = event.message
                self.watchdog.saw(msg.tp)
                source = [(SOURCE_TOPIC, msg.topic.encode()),
                          (SOURCE_PARTITION, str(msg.partition).encode()),
                          (SOURCE_OFFSET, str(msg.offset).encode())]
                pending.append((msg.key, msg.value or b"",
                                [*_bytes_headers(list(msg.headers or [])), *source]))

            async def forward(batch: list[tuple[Any, bytes, list[tuple[str, bytes]]]] = pending
                              ) -> None:
                await asyncio.gather(*[await self.scheduler_topic.send(
                    key=key, value=value, partition=0, headers=headers, force=True)
                    for key, value, headers in batch])

            await self._deliver("forward to the scheduler topic", forward)
            self.stats.forwarded += len(events)

    async def _tick(self) -> None:
        """The scheduler's clock: a tick record on its own topic (decided like any input, so
        replays see the same ticks): releases due backoffs, finds lost executors."""
        if self.stats.ready_s is None:
            return
        tick = ev.ControlCommand(task_id="", team="", command=TICK, requested_by=SERVICE)
        await self.scheduler_topic.send(key=b"", value=self.serde.encode(tick), partition=0,
                                        force=True)

    async def _agent(self, stream: StreamT[bytes]) -> None:
        batches = stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S)  # type: ignore[attr-defined]
        async for events in batches:
            await self.process_batch(events)

    async def process_batch(self, events: Sequence[EventT[bytes]]) -> None:
        """Apply a batch of scheduler records (called inside the agent's ``async for``).

        Decisions are taken in order on the in-memory world; then every output is published
        and acknowledged at once, and only then are the changed rows written (effects first,
        then the rows that record them). One acknowledgement wait per batch."""
        if self.world is None:
            self.world = World.load((k, v) for k, v in self.table.items())
        world = self.world
        outputs: list[Event] = []
        for event in events:
            outputs.extend(self._decide_one(world, event))
        try:
            if outputs:
                await self._deliver("publish decisions",
                                    lambda: self._publish_acked(outputs))
        except BaseException:
            self.world = None  # reload from the table: these decisions were not recorded
            raise
        rows = world.take_rows()
        if rows:
            # the changelog partition is the partition of the current event (0: one partition)
            _current_event.set(weakref.ref(events[-1]))
            for key, value in rows:
                self.table[key] = value

    def _decide_one(self, world: World, event: EventT[bytes]) -> list[Event]:
        msg = event.message
        self.watchdog.saw(msg.tp)
        key: bytes = msg.key or b""
        value: bytes = msg.value or b""
        self.stats.processed += 1
        try:
            decoded = self.serde.decode(value)
            if decoded.task_id.encode() != key and not isinstance(decoded, ev.BudgetStatus):
                raise DecodeError(f"record key {key!r} is not the task id {decoded.task_id!r}")
        except DecodeError as exc:
            log.warning("undecodable record to DLQ", topic=msg.topic, offset=msg.offset,
                        reason=str(exc))
            self.stats.dead_letters += 1
            return [dead_letter(SERVICE, _record_of(msg), exc)]
        with task_context(decoded.task_id, event_type=type(decoded).__name__):
            started = time.perf_counter()
            try:
                outputs = self.scheduler.apply(world, decoded, stamp=ev.utcnow_ms())
            except Exception as exc:  # a bug for one event must not stop the others
                log.exception("decision failed, record to DLQ")
                self.stats.dead_letters += 1
                return [dead_letter(SERVICE, _record_of(msg), exc)]
            finally:
                self.stats.decided_s += time.perf_counter() - started
            if outputs:
                log.debug("decided", emitted=[type(o).__name__ for o in outputs])
            return outputs

    # -- views (web pages and CLI) ---------------------------------------------------------
    def held_tasks(self) -> list[dict[str, Any]]:
        world = self.world
        if world is None:
            return []
        return [{"task_id": s.task_id, "team": s.team, "kind": s.hold_kind or "queued",
                 "reason": s.hold_reason, "held_by": s.held_by, "paths": s.held_paths,
                 "since": (s.held_since or s.updated_at).isoformat(),
                 "repository": s.repository, "attempt": s.next_attempt,
                 "priority": s.spec.priority if s.spec else None}
                for s in world.held()]

    def fleet_view(self) -> dict[str, Any]:
        world = self.world
        if world is None:
            return {"ready": False}
        running: dict[str, int] = {}
        for s in world.active.values():
            running[s.team] = running.get(s.team, 0) + 1
        fleet = world.fleet
        return {"ready": True, "kill_switch": fleet.kill_switch,
                "kill_switch_reason": fleet.kill_switch_reason, "paused": fleet.paused,
                "running": running, "active": len(world.active), "waiting": len(world.waiting),
                "max_running": self.scheduler.policy.max_running,
                "spend": {k: v.model_dump() for k, v in fleet.spend.items()},
                "budget_exhausted": fleet.budget_exhausted}

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

    async def _deliver(self, what: str, send: Callable[[], Awaitable[None]]) -> None:
        """Run `send` (publish, then await the broker's acknowledgements) until it succeeds.

        faust acknowledges a take_events batch in a ``finally`` clause, even when the agent
        raises: an exception here would commit the input offsets of outputs never published,
        and the tasks would be lost (found by the chaos run: a broker restart failed the
        forwarding of 15 routed tasks, which were never scheduled). So a failed send is retried
        with backoff (duplicates are harmless: decisions are idempotent and consumers
        deduplicate by event id); after DELIVERY_LIMIT_S the process exits without returning
        to faust (no acknowledgement), and its restart re-reads the inputs from the committed
        offsets."""
        deadline = time.monotonic() + DELIVERY_LIMIT_S
        delay = 0.2
        while True:
            try:
                await send()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() > deadline:
                    log.critical("delivery keeps failing: exiting without acknowledging",
                                 what=what, error=str(exc)[:300])
                    os._exit(75)
                log.warning("delivery failed, retrying", what=what, delay_s=delay,
                            error=str(exc)[:300])
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

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
        self.world = None  # reloaded from the (recovered) table before the next decision
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
    """The original input record (topic, partition, offset before the repartition)."""
    headers = headers_dict(msg.headers)
    topic = headers.pop(SOURCE_TOPIC, None)
    partition = headers.pop(SOURCE_PARTITION, None)
    offset = headers.pop(SOURCE_OFFSET, None)
    return Record(topic=topic.decode() if topic else msg.topic,
                  partition=int(partition) if partition else msg.partition,
                  offset=int(offset) if offset else msg.offset, key=msg.key,
                  value=msg.value or b"", headers=headers,
                  timestamp_ms=int((msg.timestamp or 0) * 1000))


def _bytes_headers(headers: list[tuple[str, str | bytes | None]]) -> list[tuple[str, bytes]]:
    return [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in headers]


