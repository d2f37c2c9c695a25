"""fleetplane-reconciler: level-triggered healing of tasks whose next event was lost.

The services are edge-triggered: each reacts to the record in front of it, so a task whose next
event never arrives (a broker that lost acknowledged writes on a hard kill, a truncated log, a
consumer group reset, a bug) would wait forever. This process compares, again and again, what
should be with what is (fleetplane.reconciler.tracker): it reads every task topic and the
coordinator's state changelog from the start (read_committed), samples the committed offsets of
the ingest, router and coordinator consumer groups, and re-drives each task that waits past its
deadline at a hop whose service has already read its input: it re-publishes the input record
unchanged and puts the reason on the task's timeline (an ``Alert`` of kind
``reconciler_redrive``, stored by accounting with the task's events), counted per hop on
``GET /reconciler/stats``.

It holds no state of its own: a restart reads the topics again.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from types import FrameType
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from fleetplane.coordinator.topology import SCHEDULER_GROUP, SCHEDULER_TOPIC
from fleetplane.core import events as ev
from fleetplane.core.kafka import REDRIVE_HEADER, RenewingProducer, event_headers
from fleetplane.core.logging import get_logger
from fleetplane.core.offsets import offsets_since
from fleetplane.core.serde import default_serde
from fleetplane.core.service import bootstrap, freeze_startup_heap
from fleetplane.core.settings import Settings
from fleetplane.core.status_pages import handler_for
from fleetplane.core.topics import ALERTS, DISPATCH, DLQ, LIFECYCLE, OUTCOMES, ROUTED, key_for
from fleetplane.metrics.reconciler import ReconcilerStats
from fleetplane.metrics.setup import instrument
from fleetplane.reconciler.tracker import COORDINATOR_CHANGELOG, HOPS, GiveUp, Redrive, Tracker

SERVICE = "reconciler"
GROUP = "fleetplane-reconciler"  # never joined nor committed: the topics are read by assignment
READ_TOPICS = (*(topic for topic, _ in HOPS.values()), DISPATCH, LIFECYCLE, OUTCOMES, DLQ)
CATCH_UP_S = 10.0  # at most this long reading per pass (the next pass goes on from there)
#: how often the tracker drops what is older than the lookback (a walk over every track: not
#: every 2 s scan, 20,000 tracks in a burst)
FORGET_EVERY_S = 60.0
#: while idle (a pass read nothing and no task waits at a hop) the wait between passes doubles
#: up to this (and at most a third of the deadline): an idle fleet is not read every 2 s
IDLE_SCAN_CAP_S = 10.0

log = get_logger(__name__)


class Reconciler:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.tracker = Tracker(memory_s=settings.reconciler_lookback_s, now=clock())
        self.serde = default_serde()
        self.stats: Counter[str] = Counter()
        self.started_at = clock()
        self.last_scan_at: float | None = None
        self.read_last_pass = 0  # records the last catch_up read
        self.lock = threading.Lock()
        self._stopping = threading.Event()
        self.consumer: Consumer | None = None
        self.producer: RenewingProducer | None = None
        self.groups: dict[str, Consumer] = {}
        self.positions: dict[tuple[str, int], int] = {}  # where the next pass starts
        self._prev_routed: dict[tuple[str, int], int] = {}
        self._prev_scheduler_end: int | None = None
        self._forgot_at = clock()  # the last Tracker.forget (FORGET_EVERY_S)

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self._stopping.set()

    def open(self) -> None:
        base = self.settings.client_config()
        self.consumer = Consumer({**base, "group.id": GROUP, "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest",
                                  "isolation.level": "read_committed",
                                  # a pass ends when every partition reported its end once
                                  "enable.partition.eof": True})
        for topic in (*READ_TOPICS, COORDINATOR_CHANGELOG):
            meta = self.consumer.list_topics(topic, timeout=30).topics.get(topic)
            if meta is None or meta.error is not None:
                log.warning("topic missing: not read", topic=topic)
                continue
            for p in meta.partitions:
                self.positions[(topic, p)] = OFFSET_BEGINNING
        self._start_at_lookback()
        self.producer = RenewingProducer(self.settings.producer_config())

    def _start_at_lookback(self) -> None:
        """Each partition is read from its first record written within the lookback
        (``reconciler_lookback_s``; 0: from the start): a restart reads the last day, not every
        record of the topics' 7-90 days. A partition with nothing that recent starts at its end
        as it was before the lookup: an offset, not OFFSET_END, which a pass that reads nothing
        there would resolve again to a later end, skipping what came meanwhile; a record
        written before that end and after the lookback would have been found by the lookup."""
        lookback = self.settings.reconciler_lookback_s
        if lookback <= 0 or not self.positions:
            return
        assert self.consumer is not None
        since_ms = int((time.time() - lookback) * 1000)
        try:
            self.positions.update(offsets_since(self.consumer, list(self.positions), since_ms))
        except KafkaException as exc:  # no starting point: everything, as before
            log.warning("offsets by time unavailable: reading from the start", error=str(exc))

    def close(self) -> None:
        for c in [self.consumer, *self.groups.values()]:
            if c is not None:
                try:
                    c.close()
                except KafkaException:
                    log.warning("consumer close failed", exc_info=True)
        if self.producer is not None:
            self.producer.flush(5)

    def run(self) -> None:
        self.open()
        log.info("reconciler started", deadline_s=self.settings.reconciler_deadline_s,
                 scan_s=self.settings.reconciler_scan_s)
        try:
            wait = self.settings.reconciler_scan_s
            while not self._stopping.is_set():
                self.scan()
                wait = self.next_wait(wait)
                self._stopping.wait(wait)
        finally:
            self.close()

    def next_wait(self, previous: float) -> float:
        """The wait before the next pass: ``reconciler_scan_s`` after a pass that read records
        or while a task waits at a hop; while idle, twice the previous wait, up to
        IDLE_SCAN_CAP_S (and a third of the deadline). Nothing is late for it: a task that
        arrives meanwhile is read by the next pass, and its deadline counts from then; a task
        the coordinator owns (running, held) is not the reconciler's to time. (Each pass
        assigns and reads every partition of the task topics: about 40 ms of CPU on the
        embedded broker, a fifth of the idle stack's CPU at one pass per 2 s.)"""
        scan = self.settings.reconciler_scan_s
        if self.read_last_pass:
            return scan
        with self.lock:
            if any(t.waiting_at() is not None for t in self.tracker.tracks.values()):
                return scan
        cap = max(scan, min(IDLE_SCAN_CAP_S, self.settings.reconciler_deadline_s / 3))
        return min(max(previous, scan) * 2, cap)

    # -- reading ---------------------------------------------------------------------------
    def catch_up(self) -> bool:
        """Read every partition from where the last pass stopped to its end (up to CATCH_UP_S).
        The partitions are assigned for the pass only: between scans nothing is fetched (the
        embedded broker answers empty fetches at once, so an idle assigned consumer spins).
        True: the pass reached the end: every partition reported its end (the last stable
        offset) at least once. (It used to wait for a 0.3 s round that read nothing, which a
        steady stream of tasks never gives: the reconciler stayed assigned and fetching for the
        whole CATCH_UP_S of every pass, about a tenth of a core at 26 tasks/s.)"""
        assert self.consumer is not None
        self.consumer.assign([TopicPartition(t, p, o) for (t, p), o in self.positions.items()])
        deadline = self.clock() + CATCH_UP_S
        waiting = set(self.positions)
        self.read_last_pass = 0
        try:
            while waiting and self.clock() < deadline:
                msgs = self.consumer.consume(1000, 0.05)
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            waiting.discard((msg.topic() or "", msg.partition() or 0))
                        continue
                    topic, partition = msg.topic() or "", msg.partition() or 0
                    offset = msg.offset() or 0
                    self.positions[(topic, partition)] = offset + 1
                    self.read_last_pass += 1
                    self.observe(topic, partition, offset, msg.key(), msg.value(),
                                 msg.headers())
            for tp in self.consumer.position(self.consumer.assignment()):
                if tp.offset >= 0:  # past aborted records and transaction markers too
                    self.positions[(tp.topic, tp.partition)] = tp.offset
        finally:
            self.consumer.unassign()
        return not waiting

    def observe(self, topic: str, partition: int, offset: int, key: bytes | None,
                value: bytes | None, headers: Any) -> None:
        with self.lock:
            if topic == COORDINATOR_CHANGELOG:
                self.tracker.row(key, value is not None)
                return
            if not value:
                return
            try:
                event = self.serde.decode(value)
            except Exception:  # ingest dead-letters it; nothing to track
                self.stats["undecodable"] += 1
                return
            pairs = tuple((str(k), v if isinstance(v, bytes) else str(v or "").encode())
                          for k, v in (headers or []))
            self.tracker.observe(event, topic=topic, partition=partition, offset=offset,
                                 key=key, value=value, headers=pairs, now=self.clock())

    def committed(self) -> dict[tuple[str, int], int]:
        """Each hop's group: the committed offset per partition of its input topic.

        The coordinator reads tasks.routed in two steps (a repartition onto its scheduler topic,
        then the schedule step); its repartition group's offsets count only from the previous
        sample, and only if the schedule step has since read everything that was on the
        scheduler topic at that sample: otherwise a backlog (or a coordinator down) would look
        like a lost event."""
        out: dict[tuple[str, int], int] = {}
        for hop, (topic, group) in HOPS.items():
            if hop == "router":  # the one hop whose group a setting names
                group = self.settings.router_group_id
            out.update(self._group_offsets(group, topic))
        scheduler_end = self._end(SCHEDULER_TOPIC)
        scheduler_read = self._group_offsets(SCHEDULER_GROUP, SCHEDULER_TOPIC).get(
            (SCHEDULER_TOPIC, 0), -1)
        routed_prev = self._prev_routed
        prev_end = self._prev_scheduler_end
        self._prev_routed = {k: v for k, v in out.items() if k[0] == ROUTED}
        self._prev_scheduler_end = scheduler_end
        for k in [k for k in out if k[0] == ROUTED]:
            del out[k]
        if prev_end is not None and 0 <= prev_end <= scheduler_read:
            out.update(routed_prev)
        else:
            self.stats["coordinator_behind"] += 1
        return out

    def _group_offsets(self, group: str, topic: str) -> dict[tuple[str, int], int]:
        assert self.consumer is not None
        consumer = self.groups.get(group)
        if consumer is None:
            consumer = self.groups[group] = Consumer({**self.settings.client_config(),
                                                      "group.id": group,
                                                      "enable.auto.commit": False})
        out: dict[tuple[str, int], int] = {}
        try:
            meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None:
                return out
            tps = [TopicPartition(topic, p) for p in meta.partitions]
            for tp in consumer.committed(tps, timeout=10):
                if tp.error is None and tp.offset >= 0:
                    out[(topic, tp.partition)] = tp.offset
        except KafkaException as exc:  # broker away: no evidence, no re-drive
            log.warning("committed offsets unavailable", group=group, error=str(exc))
        return out

    def _end(self, topic: str) -> int | None:
        assert self.consumer is not None
        try:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10,
                                                          cached=False)
            return int(high)
        except KafkaException:
            return None

    # -- deciding and acting ---------------------------------------------------------------
    def scan(self) -> list[Redrive | GiveUp]:
        """One round: sample the groups' committed offsets, read the log to its end, decide,
        re-drive. Nothing is decided from a pass that did not reach the end (the answers of
        the records read may be further on)."""
        committed = self.committed()  # before reading on: answers committed by now are read
        if not self.catch_up():
            self.stats["partial_reads"] += 1
            return []
        with self.lock:
            actions = self.tracker.due(committed, self.clock(),
                                       deadline_s=self.settings.reconciler_deadline_s,
                                       max_redrives=self.settings.reconciler_max_redrives)
            self.stats["scans"] += 1
            self.last_scan_at = self.clock()
            if self.last_scan_at - self._forgot_at >= FORGET_EVERY_S:
                self._forgot_at = self.last_scan_at
                self.stats["forgotten"] += self.tracker.forget(self.last_scan_at)
        for action in actions:
            self.act(action)
        if actions:
            assert self.producer is not None
            remaining = self.producer.flush(30)
            if remaining:
                log.error("re-drives not acknowledged", pending=remaining)
        return actions

    def act(self, action: Redrive | GiveUp) -> None:
        assert self.producer is not None
        if isinstance(action, Redrive):
            fact = action.fact
            headers: list[tuple[str, str | bytes | None]] = [
                (k, v) for k, v in fact.headers if k != REDRIVE_HEADER]
            headers.append((REDRIVE_HEADER, str(action.attempt).encode()))
            self.producer.produce(fact.topic, key=fact.key, value=fact.value,
                                  partition=fact.partition, headers=headers)
            self.stats[f"redrives.{action.hop}"] += 1
            log.warning("task re-driven", task_id=action.task_id, hop=action.hop,
                        redrive=action.attempt, reason=action.reason)
            alert = ev.Alert(event_id=ev.derived_id(fact.event_id,
                                                    f"reconciler/{action.hop}/{action.attempt}"),
                             task_id=action.task_id, team=action.team, severity="warning",
                             kind="reconciler_redrive", message=action.reason,
                             metric=f"reconciler_redrives.{action.hop}",
                             value=float(action.attempt))
        else:
            self.stats[f"gave_up.{action.hop}"] += 1
            log.error("task left to an operator", task_id=action.task_id, hop=action.hop,
                      reason=action.reason)
            alert = ev.Alert(event_id=ev.derived_id(action.task_id,
                                                    f"reconciler/{action.hop}/gave-up"),
                             task_id=action.task_id, team=action.team, severity="critical",
                             kind="reconciler_gave_up", message=action.reason)
        self.producer.produce(ALERTS, key=key_for(alert), value=self.serde.encode(alert),
                              headers=event_headers(alert))
        self.producer.poll(0)

    def view(self) -> dict[str, Any]:
        with self.lock:
            waiting = Counter(t.waiting_at() or "none" for t in self.tracker.tracks.values())
            return {"service": SERVICE, "tracked": len(self.tracker),
                    "finished": len(self.tracker.finished),
                    "recorded_by_coordinator": len(self.tracker.recorded),
                    "waiting_at": dict(waiting), "counters": dict(self.stats),
                    "deadline_s": self.settings.reconciler_deadline_s,
                    "last_scan_s_ago": (None if self.last_scan_at is None
                                        else round(self.clock() - self.last_scan_at, 1))}


def serve(reconciler: Reconciler, host: str, port: int) -> ThreadingHTTPServer:
    """GET /healthz and /reconciler/stats (JSON) in a daemon thread."""

    handler = handler_for({
        "/healthz": lambda: (200, {"ready": True, "service": SERVICE}),
        "/reconciler/stats": lambda: (200, reconciler.view()),
    })
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def main() -> None:
    settings = bootstrap(SERVICE)
    obs = instrument(settings, SERVICE)  # docs/operations.md, "Metrics"
    reconciler = Reconciler(settings)
    obs.registry.register(ReconcilerStats(reconciler.view))
    obs.serve(settings.reconciler_metrics_port)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        reconciler.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = serve(reconciler, settings.bind_host, settings.reconciler_port)
    # later collections do not scan the start-up heap (core.service.freeze_startup_heap)
    log.info("start-up heap frozen", objects=freeze_startup_heap())
    try:
        reconciler.run()
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
