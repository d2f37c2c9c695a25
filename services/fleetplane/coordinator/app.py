"""The coordinator process: a standby until the active coordinator goes quiet, then the active one.

Admission needs state that spans tasks (leases per repository, running tasks and spend per
team, fair share between teams), so the decisions cannot be taken per task-id partition. The
active process runs two transactional consume-transform-produce steps (core.loop.Processor,
confluent-kafka) and a clock:

* **repartition**: consumes the six-partition inputs and forwards every record, bytes and headers
  unchanged (plus where it was read), onto the internal topic ``fleetplane-coordinator-scheduler``
  (one partition). Undecodable records and records whose key is not the task id go to fleet.dlq
  here, with their real source. Forwarded copies and input offsets commit in one transaction.
* **schedule**: consumes that one partition: one writer sees every task in one total order that
  survives restarts. Its state, the ``World`` (TaskRow / FleetState rows), lives in memory in a
  ``core.table.ChangelogTable`` backed by the compacted topic
  ``fleetplane-coordinator-scheduler-changelog``: per record, ``Scheduler.apply`` decides, and
  the decided events, the changed rows and the input offset commit in one Kafka transaction
  (the Kafka Streams state-store model). On partition assignment the table is restored from the
  changelog (read_committed, to its end) before any scheduler record is read.
* **clock**: a ``ControlCommand(command="tick")`` onto the scheduler topic every
  ``FLEETPLANE_COORDINATOR_TICK_S``, so backoff releases and heartbeat checks are records in the
  scheduler's total order (replays see the same ticks). The ticks are also the active's pulse.

Failover. Every coordinator process starts as a standby; the active is the process the
scheduler group assigns the scheduler partition to. The embedded broker never expires a dead
member, so the standby judges when the active is gone (``Liveness``: no progress of the active
on the broker, i.e. the scheduler topic's end, the changelog's end and the scheduler group's
committed offset, for ``FLEETPLANE_COORDINATOR_TAKEOVER_S`` or longer on a loaded machine, over
enough answered looks), then takes its place in the group: it fences the previous
active (``init_transactions`` with the previous holder's transactional ids, which it read from
the ``x-coordinator-epoch`` header of its ticks: that aborts its open transactions and fences
its producers, should it be alive after all), joins both consumer groups with the *role's*
static member id (``group.instance.id``), which replaces the dead member at once (the embedded
broker never expires a member killed with SIGKILL, static or dynamic), opens its own
transactional producers with fresh ids (``<role>-<epoch>``: reusing the previous holder's id,
hence its producer id, leaves the new commits invisible to read_committed consumers on the
embedded broker until some other transaction ends), restores the table and goes on from the
committed offsets. A previous active that was not dead after all fails its next commit and
exits; the supervisor restarts it as a standby. See docs/coordinator.md.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from fleetplane.coordinator.claims import ActiveClaim
from fleetplane.coordinator.policy import policy_for_settings
from fleetplane.coordinator.purge import CommittedPurger
from fleetplane.coordinator.repartition import repartition, source_record, tick_reason
from fleetplane.coordinator.scheduler import TICK, Scheduler, changes_nothing
from fleetplane.coordinator.standby import watch_active
from fleetplane.coordinator.stats import Stats
from fleetplane.coordinator.topology import (
    APP_ID,
    CHANGELOG,
    INPUTS,
    OWNER_HEADER,
    REPARTITION_ROLE,
    REPLAYED,
    SCHEDULE_ROLE,
    SCHEDULER_GROUP,
    SCHEDULER_ISOLATION,
    SCHEDULER_TOPIC,
    SERVICE,
)
from fleetplane.coordinator.web import WebPages, fleet_view, held_tasks
from fleetplane.coordinator.world import World, settle_heap
from fleetplane.core import events as ev
from fleetplane.core import topics as t
from fleetplane.core.errors import EXIT_RESTART, Fatal
from fleetplane.core.kafka import event_headers
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import Output, Processor, Record, dead_letter
from fleetplane.core.offsets import position_new_group, replay_recent
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.table import ChangelogTable
from fleetplane.core.txn_ids import TxnIds

#: a brand-new repartition group reads at least this far back (App._position_new_group)
NEW_GROUP_MIN_LOOKBACK_S = 600.0
#: how often the active purges the scheduler topic's committed records (coordinator/purge.py)
PURGE_EVERY_S = 2.0

log = get_logger(__name__)


class Coordinator:
    """One coordinator process: standby, then active (repartition, schedule, clock, web)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = Stats(instance=settings.instance_id)
        self.started_at = time.monotonic()
        self.active_at: float | None = None
        self.scheduler = Scheduler(policy_for_settings(settings))
        self.table = ChangelogTable(CHANGELOG)
        self.world: World | None = None  # loaded from the table after each restore
        self.lock = threading.Lock()  # the world between the schedule step and the web views
        self._stopping = threading.Event()
        self._take_over = threading.Event()  # a planned failover (take_over_now)
        # this process's term as the active: its transactional ids are <role>-<epoch>
        self.epoch = f"{settings.instance_id}-{time.time_ns() // 1_000_000}"
        self.previous_epoch: str | None = None  # read from the latest ticks on takeover
        # per input partition read again on assignment: where the records read again end
        self.replay_until: dict[tuple[str, int], int] = {}
        # two standbys that take the role at once: the later claim wins (coordinator.claims)
        self.claim = ActiveClaim(settings, self.epoch, self.fence_epoch)
        self.repartitioner = Processor(
            SERVICE, INPUTS, self.forward, settings, group_id=APP_ID, transactional=True,
            instance_id=f"{REPARTITION_ROLE}-{self.epoch}", group_instance_id=REPARTITION_ROLE,
            on_assign=self._replay_inputs, on_ready=self.claim.check)
        self.schedule = Processor(
            SERVICE, [SCHEDULER_TOPIC], self.decide, settings, group_id=SCHEDULER_GROUP,
            transactional=True, instance_id=f"{SCHEDULE_ROLE}-{self.epoch}",
            group_instance_id=SCHEDULE_ROLE, on_assign=self._on_assign,
            on_abort=self._on_abort, on_ready=self.claim.check, isolation=SCHEDULER_ISOLATION,
            before_commit=self.changelog)
        self.web: WebPages | None = None

    # -- the schedule step -----------------------------------------------------------------
    def decide(self, event: ev.Event, rec: Record) -> list[Output]:
        """Decide one scheduler record: the events to publish. The rows it changed are written
        once per transaction (`changelog`), with the events and the batch's offsets."""
        with self.lock:
            world = self.world
            if world is None:  # the on_assign hook restores before any record is read
                raise Fatal("scheduler record before the table was restored")
            self.stats.processed += 1
            if not (isinstance(event, ev.ControlCommand) and event.command == TICK):
                self.stats.task_events += 1
            started = time.perf_counter()
            try:
                outputs: list[Output] = list(
                    self.scheduler.apply(world, event, stamp=ev.utcnow_ms()))
            except Exception as exc:  # a bug for one event must not stop the others
                log.exception("decision failed, record to DLQ")
                self.stats.dead_letters += 1
                return [dead_letter(SERVICE, source_record(rec), exc)]
            finally:
                self.stats.decided_s += time.perf_counter() - started
            self.stats.published += len(outputs)
            self.stats.forgotten += self.scheduler.forgotten
            return outputs

    def changelog(self) -> list[Output]:
        """Before each commit of the schedule step: the rows the transaction's records changed,
        each key once with its last value (the record cache of Kafka Streams). A task routed,
        held and dispatched in one batch is one changelog record, not three; a row is
        serialised once per transaction. A restore reads the same rows: only committed
        transactions are read, and within one only the last value of a key counts."""
        with self.lock:
            world = self.world
            if world is None:
                return []
            for key, value in world.take_rows():
                self.table.put(key, value)
            return list(self.table.changes())

    def restore(self) -> None:
        """Read the table from its changelog and rebuild the world from it."""
        with self.lock:
            self.world = None
            self.table.invalidate()
            restored = self.table.restore(self.settings.client_config())
            loading = time.monotonic()
            self.world = World.load(self.table.items())
            settle_heap()  # the rows out of the collector's sight, fewer young collections
            now = time.monotonic()
            self.stats.world_load_s = round(now - loading, 3)
            self.stats.restores += 1
            self.stats.restore_s = restored.seconds
            self.stats.recovered_rows = restored.rows
            self.stats.changelog_records = restored.records
            if self.active_at is not None:
                self.stats.recovery_s = round(now - self.active_at, 3)
            if self.stats.ready_s is None:
                self.stats.ready_s = round(now - self.started_at, 3)
        log.info("table restored", rows=restored.rows, records=restored.records,
                 restore_s=restored.seconds, recovery_s=self.stats.recovery_s)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("scheduler partitions assigned", partitions=[p.partition for p in partitions])
        if partitions:
            self.stats.role = "active"  # the group gave this process the partition
        if partitions and self.table.restored is None:
            self.restore()

    def _replay_inputs(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """The repartition step's outcomes and lifecycle inputs, on assignment (a takeover, a
        restart): read again from ``coordinator_replay_s`` back (of the lifecycle, only the
        starts are forwarded: `forward`). Chaos runs found completions committed on
        tasks.outcomes, and forwarded, that the scheduler's restored table never had after a
        broker crash (its SIGKILL keeps offsets and loses the last writes): those attempts were
        declared lost and ran twice. Forwarded again, they are applied now; the copies already
        applied are ignored (a terminal row takes nothing more; TaskRow.seen), and the ticks'
        read-until mark holds the lost-attempt check back until the step has caught up
        (`tick_reason`). Only the outcomes and the starts: an outcome applies the same in any
        order, a start only to its attempt while dispatched or running, while the other
        inputs read again in another order than the first time could decide otherwise (a
        chaos run: the replayed workspace changes of two tasks that had run one after the
        other, applied to a table that had lost their outcomes, rolled both back as
        overlapping)."""
        self.replay_until.clear()
        self.stats.replayed += replay_recent(consumer, partitions,
                                             self.settings.coordinator_replay_s, REPLAYED,
                                             until=self.replay_until)

    def forward(self, event: ev.Event, rec: Record) -> list[Output]:
        """The repartition step's handler: `repartition`, except that of the lifecycle read
        again only the starts are forwarded. A chaos run (stop 21) had four attempts whose
        TaskStarted the broker's SIGKILL lost downstream: the table kept them dispatched and
        never started until the 300 s start timeout; applied again, the start gives the
        attempt its lease, which expires 30 s later and retries it at once. Heartbeats and
        the coordinator's own lifecycle events are not needed again (a newer heartbeat comes
        on its own; a replayed TaskStarted older than the row's heartbeat changes nothing).
        Events the scheduler decides nothing on (`changes_nothing`) are not forwarded."""
        copy = repartition(event, rec)  # a key that is not the task id: a dead letter
        if changes_nothing(event):  # the coordinator's own holds etc., read back
            return []
        if rec.topic == t.LIFECYCLE and not isinstance(event, ev.TaskStarted) \
                and rec.offset < self.replay_until.get((rec.topic, rec.partition), -1):
            return []
        return copy

    def _on_abort(self) -> None:
        """An aborted transaction: the in-memory rows may hold uncommitted changes."""
        log.warning("scheduler transaction aborted: restoring the table")
        self.restore()

    # -- roles -----------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self._stopping.set()
        self.repartitioner.stop()
        self.schedule.stop()

    def take_over_now(self, *_: Any) -> None:
        """A planned failover (SIGUSR2 to a standby): take the active role without waiting
        for the active to go quiet. The claim (coordinator.claims) fences the active, whose
        next commit fails: it exits, and its supervisor restarts it as a standby."""
        self._take_over.set()

    def wait_for_silence(self) -> bool:
        """Standby: until the active is gone (True; the holder to fence is then
        `previous_epoch`), or stop (False). coordinator.standby.watch_active."""
        gone, self.previous_epoch = watch_active(self.settings, self._stopping,
                                                 self._take_over)
        return gone

    def _position_new_group(self) -> None:
        """A brand-new repartition group (renamed, or its offsets expired by the broker after a
        long stop) starts at the inputs of the terminal retention, not their whole retention
        (30 days of tasks.routed): a TaskRouted of a task finished and forgotten since would be
        a new task and run again (docs/coordinator.md, "A new group"). Retention 0 keeps every
        finished task: the group then starts by its offset reset (the beginning)."""
        retention = self.settings.coordinator_terminal_retention_s
        if retention > 0:
            position_new_group(self.settings, APP_ID, list(INPUTS),
                               max(retention, NEW_GROUP_MIN_LOOKBACK_S))

    def fence_previous(self) -> None:
        """Abort the previous active's open transactions and fence its producers, by opening
        (and closing at once) producers with its transactional ids."""
        if not self.previous_epoch or self.previous_epoch == self.epoch:
            return
        started = time.monotonic()
        self.fence_epoch(self.previous_epoch, fresh=False)
        log.info("fenced the previous active", epoch=self.previous_epoch,
                 seconds=round(time.monotonic() - started, 3))

    def fence_epoch(self, epoch: str, fresh: bool = True) -> None:
        """Fence the transactional ids of both steps of the holder with ``epoch``: the
        latest generations it registered (read ``fresh`` for a claimant of the last
        seconds)."""
        ids = TxnIds(self.settings)
        for i, role in enumerate((REPARTITION_ROLE, SCHEDULE_ROLE)):
            stable = f"{role}-{epoch}"  # its loops wrote as generations of it
            # one fresh reading of the registry serves both roles (it renews the snapshot)
            ids.fence(stable, ids.latest(stable, fresh=fresh and i == 0))

    def run(self) -> int:
        """The process: standby, then active until stopped. Returns the exit status."""
        # a warm copy of the table while standing by: the takeover reads only the tail
        self.table.follow(self.settings.client_config())
        if not self.wait_for_silence():
            self.table.unfollow()
            return 0
        self.active_at = time.monotonic()
        self.stats.role = "taking over"  # "active" once the group assigns the partition
        self.stats.standby_s = round(self.active_at - self.started_at, 3)
        log.info("taking the active role", standby_s=self.stats.standby_s, epoch=self.epoch)
        self.claim.claim()
        self.fence_previous()
        self.claim.previous = self.previous_epoch
        self._position_new_group()
        self._serve_web()
        failed: list[BaseException] = []
        threads = [self._thread("repartition", self.repartitioner.run, failed),
                   self._thread("schedule", self.schedule.run, failed),
                   self._thread("clock", self._clock, failed),
                   self._thread("purge", self._purge, failed)]
        for th in threads:
            th.start()
        while not self._stopping.is_set() and not failed:
            self._stopping.wait(0.2)
        if failed:
            log.critical("a coordinator step failed: exiting for a restart",
                         error=str(failed[0])[:500])
            self.stop()
            # the steps' transactions are aborted by the next owner's fencing
            os._exit(EXIT_RESTART)
        for th in threads:
            th.join(30)
        if self.web is not None:
            self.web.shutdown()
        log.info("coordinator stopped", **{k: v for k, v in self.stats_view().items()
                                           if k in ("processed", "forwarded", "published")})
        return 0

    def _thread(self, name: str, target: Callable[[], None],
                failed: list[BaseException]) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as exc:
                log.exception("coordinator step failed", step=name)
                failed.append(exc)

        return threading.Thread(target=body, name=name, daemon=True)

    def _clock(self) -> None:
        """Ticks onto the scheduler topic (not transactional: visible at once). The producer is
        not idempotent: a duplicated or lost tick is harmless (the next one comes 0.5 s later),
        and an idempotent producer's sequence state does not survive a broker restart on the
        embedded broker (a fatal OUT_OF_ORDER_SEQUENCE_NUMBER, seen in the chaos run)."""
        config = {**self.settings.producer_config(), "enable.idempotence": False}
        producer = Producer(config)
        serde = default_serde()
        # a holder ticks only once its claim check fenced the earlier claimants: the ticks
        # name the holder a later claimant fences, and it fences only the claims after that
        # holder's (coordinator.claims.judge)
        self._wait_for_claim()
        try:
            while not self._stopping.is_set():
                tick = ev.ControlCommand(task_id="", team="", command=TICK,
                                         requested_by=SERVICE,
                                         reason=tick_reason(self.repartitioner))
                try:
                    producer.produce(SCHEDULER_TOPIC, key=b"", value=serde.encode(tick),
                                     partition=0, headers=[*event_headers(tick),
                                                           (OWNER_HEADER, self.epoch.encode())])
                    producer.poll(0)
                except (KafkaException, BufferError) as exc:
                    log.warning("tick not produced: new producer", error=str(exc)[:300])
                    producer = Producer(config)
                self._stopping.wait(self.settings.coordinator_tick_s)
        finally:
            with contextlib.suppress(KafkaException):
                producer.flush(5)

    def _wait_for_claim(self) -> bool:
        """Until this holder's claim check passed (True) or the process stops (False)."""
        while not self.claim.passed.wait(0.05):
            if self._stopping.is_set():
                return False
        return True

    def _purge(self) -> None:
        """The scheduler topic's committed records deleted every PURGE_EVERY_S (a thread of
        its own: a slow broker answer delays no tick). Best effort: nothing here stops the
        process."""
        keep_s = self.settings.coordinator_purge_keep_s
        if keep_s <= 0 or not self._wait_for_claim():
            return
        purger = CommittedPurger(self.settings, SCHEDULER_TOPIC, SCHEDULER_GROUP, keep_s)
        try:
            while not self._stopping.wait(PURGE_EVERY_S):
                try:
                    purger.round()
                except Exception:  # a bug in a purge must not end the active
                    log.exception("scheduler purge failed")
        finally:
            purger.close()

    # -- views (web pages and CLI) ---------------------------------------------------------
    def held_tasks(self) -> list[dict[str, Any]]:
        with self.lock:
            return [] if self.world is None else held_tasks(self.world)

    def fleet_view(self) -> dict[str, Any]:
        with self.lock:
            if self.world is None:
                return {"ready": False}
            return fleet_view(self.world, self.scheduler.policy.max_running)

    def stats_view(self) -> dict[str, Any]:
        world = self.world
        return {**asdict(self.stats), "rows": len(self.table),
                "terminal_rows": world.terminal if world is not None else None,
                "forwarded": self.repartitioner.processed}

    def _serve_web(self) -> None:
        """The active's HTTP pages (coordinator.web), bound when the role is taken."""
        self.web = WebPages(self.settings.bind_host, self.settings.coordinator_web_port, {
            "/healthz": lambda: (200 if self.world is not None else 503,
                                 {"ready": self.world is not None, "service": SERVICE,
                                  "role": self.stats.role}),
            "/coordinator/stats": lambda: (200, self.stats_view()),
            "/coordinator/held": lambda: (200, self.held_tasks()),
            "/coordinator/fleet": lambda: (200, self.fleet_view()),
        }, self._stopping)
        self.web.start()
