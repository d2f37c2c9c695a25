"""The standby's watch of the active coordinator: it judges that the active is gone from the
active's progress on the broker (``Liveness``), and finds the epoch of the holder to fence from
the latest ticks (docs/coordinator.md, "Failover")."""

from __future__ import annotations

import random
import threading
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from fleetplane.coordinator.claims import CLAIMS_TOPIC
from fleetplane.coordinator.liveness import Liveness
from fleetplane.coordinator.topology import (
    APP_ID,
    CHANGELOG,
    OWNER_HEADER,
    SCHEDULER_GROUP,
    SCHEDULER_TOPIC,
)
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import headers_dict
from fleetplane.core.settings import Settings

WATCH_BACKLOG = 2_000  # scheduler records read back per window to find the latest tick
WATCH_INTERVAL_S = 0.25  # between two looks of a standby at the active's progress
SLOW_LOOK_S = 2.0  # a look at the progress marks answered slower than this proves nothing

log = get_logger(__name__)


def watch_active(settings: Settings, stopping: threading.Event, take_over: threading.Event
                 ) -> tuple[bool, str | None]:
    """Standby: until the active is gone (True, and the epoch of the holder to fence, if
    found), or `stopping` is set (False). `take_over` set: a planned failover, at once.

    The judgement (``Liveness``) rests on progress the active makes on the broker (the end
    of the scheduler topic, the end of the changelog, the scheduler group's committed
    offset, the end of the claims topic), read with fresh requests: load on either process
    delays the looks, never fakes silence. Nothing is fetched while watching (four small
    requests per look): the epoch of the holder to fence is read from the latest ticks
    once, on takeover (``find_owner``). A standby that fetched the scheduler topic
    continuously spent more CPU than the router (the embedded broker answers empty fetches
    at once)."""
    config = settings.client_config()
    watch = Consumer({**config, "group.id": f"{APP_ID}-watch",
                      "enable.auto.commit": False, "isolation.level": "read_uncommitted",
                      "enable.partition.eof": True, "auto.offset.reset": "latest"})
    # reads the scheduler group's committed offset only (never subscribes: never joins)
    offsets = Consumer({**config, "group.id": SCHEDULER_GROUP, "enable.auto.commit": False})
    # a little jitter, so two processes started together rarely both take over
    liveness = Liveness(settings.coordinator_takeover_s + random.uniform(0, 0.5),
                        time.monotonic())
    log.info("standby: watching the active coordinator", topic=SCHEDULER_TOPIC,
             takeover_s=settings.coordinator_takeover_s)
    tp, changelog = TopicPartition(SCHEDULER_TOPIC, 0), TopicPartition(CHANGELOG, 0)
    claims = TopicPartition(CLAIMS_TOPIC, 0)
    try:
        while not stopping.wait(WATCH_INTERVAL_S):
            if take_over.is_set():
                end = watch.get_watermark_offsets(tp, timeout=5, cached=False)[1]
                previous = find_owner(watch, end)
                log.warning("asked to take over (planned failover)",
                            previous=previous)
                return True, previous
            asked = time.monotonic()
            try:
                # a claim by another process counts as progress: a standby restarted
                # while another one was taking over gives the claimant a full timeout to
                # start ticking, instead of claiming after it and making it stand down
                marks = (watch.get_watermark_offsets(tp, timeout=5, cached=False)[1],
                         watch.get_watermark_offsets(changelog, timeout=5,
                                                     cached=False)[1],
                         offsets.committed([tp], timeout=5)[0].offset,
                         claims_end(watch, claims))
            except KafkaException:  # no answer: no evidence either way
                liveness.reset(time.monotonic())
                continue
            now = time.monotonic()
            if now - asked > SLOW_LOOK_S and marks == liveness.marks:
                # a broker this slow to answer holds the active back as well: no evidence
                liveness.reset(now)
                continue
            if liveness.observe(marks, now):
                previous = find_owner(watch, marks[0])
                log.warning("the active coordinator made no progress: taking over",
                            previous=previous, **liveness.describe(now))
                return True, previous
        return False, None
    finally:
        watch.close()
        offsets.close()


def find_owner(watch: Consumer, end: int, timeout_s: float = 20.0) -> str | None:
    """The epoch of the latest tick before ``end`` on the scheduler topic (the holder of
    the active role to fence), read backwards in windows of ``WATCH_BACKLOG`` records
    (read_uncommitted: an open transaction of a dead active must not hide its ticks)."""
    deadline = time.monotonic() + timeout_s
    tp = TopicPartition(SCHEDULER_TOPIC, 0)
    try:
        low = watch.get_watermark_offsets(tp, timeout=5, cached=False)[0]
    except KafkaException:
        low = 0
    while end > low and time.monotonic() < deadline:
        start, owner, done = max(low, end - WATCH_BACKLOG), None, False
        watch.assign([TopicPartition(SCHEDULER_TOPIC, 0, start)])
        while not done and time.monotonic() < deadline:
            for msg in watch.consume(1000, 0.2):
                err = msg.error()
                if err is not None:
                    done = done or err.code() == KafkaError._PARTITION_EOF
                    continue
                if (msg.offset() or 0) >= end:
                    done = True
                    continue
                found = headers_dict(msg.headers()).get(OWNER_HEADER)
                if found:
                    owner = found.decode()
            done = done or watch.position([tp])[0].offset >= end
        watch.unassign()
        if owner is not None:
            return owner
        end = start
    return None


def claims_end(watch: Consumer, claims: TopicPartition) -> int:
    """The end of the claims topic, or -1 where it cannot be read (a deployment whose topics
    predate it): the other marks then decide alone."""
    try:
        return int(watch.get_watermark_offsets(claims, timeout=5, cached=False)[1])
    except KafkaException:
        return -1
