"""Hand-off doorbells (core.doorbell): a commit wakes the parked consumers of its topics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from confluent_kafka import Producer as ConfluentProducer

from fleetplane.core import doorbell
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import Processor, Record
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import LIFECYCLE, SUBMITTED
from tests.integration.test_loop import run_processor  # noqa: F401  (the fixture)

#: the parked hops' probe interval: longer than any test, so no periodic probe can read the
#: test's record; the loops still stop at once (stop() rings their own doorbell). (Raised
#: from 20 s in stop 26 for a ring count of 0 in a long session; that did not cure it: the
#: flake and its suspected cause are in docs/testing.md.)
PROBE_S = 600.0
#: well inside the probe interval: a hand-off later than this was not the doorbell's
HANDOFF_S = 10.0


def test_a_ring_reaches_the_listeners_of_its_topic_only(unique: str) -> None:
    cluster = f"bell-{unique}:9092"
    routed = doorbell.Listener(cluster, ["tasks.routed"])
    other = doorbell.Listener(cluster, ["tasks.accepted"])
    try:
        assert doorbell.ring(cluster, ["tasks.routed"]) == 1
        assert routed.wait(5.0)
        assert not other.wait(0.05)
        assert not routed.wait(0.05)  # the ring was taken
        assert doorbell.ring(f"another-{unique}:9092", ["tasks.routed"]) == 0
    finally:
        routed.close()
        other.close()


def test_a_ring_removes_the_entry_of_a_killed_listener(unique: str) -> None:
    cluster = f"bell-{unique}:9092"
    dead = doorbell.Listener(cluster, ["tasks.routed"])
    dead.sock.close()  # as a SIGKILL leaves it: the socket file and its link stay behind
    alive = doorbell.Listener(cluster, ["tasks.routed"])
    try:
        assert doorbell.ring(cluster, ["tasks.routed"]) == 1
        assert not dead.path.exists()
        assert all(not link.exists() for link in dead.links)
        assert alive.wait(5.0)
    finally:
        alive.close()


def wait_parked(*loops: Processor, timeout_s: float = 90.0) -> None:
    """Until every loop is parked idle: not parked for the work of a batch (a hop parks while
    it handles each batch of a backlog, and then probes at once without a doorbell)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(p._idle is not None and p._idle.idle and not p._idle._probe_next
               for p in loops):
            return
        time.sleep(0.05)
    raise AssertionError("the loops never parked")


@dataclass
class TwoHops:
    """Two parked hops: SUBMITTED -> (TaskHeld) -> LIFECYCLE; `seen` when the second got it."""

    first: Processor
    second: Processor
    seen: dict[str, float]
    done: threading.Event


def two_hops(name: str, settings: Settings, unique: str,
             run_processor: Callable[[Processor], Processor]) -> TwoHops:  # noqa: F811
    seen: dict[str, float] = {}
    done = threading.Event()

    def first(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id.startswith(unique) and isinstance(event, ev.TaskSubmitted):
            yield event.derive(ev.TaskHeld, reason=f"held-{unique}")

    def second(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id.startswith(unique) and isinstance(event, ev.TaskHeld):
            seen[event.task_id] = time.monotonic()
            done.set()
        return ()

    hop1 = run_processor(Processor(f"{name}1-{unique}", [SUBMITTED], first, settings,
                                   group_id=f"{name}1-{unique}"))
    hop2 = run_processor(Processor(f"{name}2-{unique}", [LIFECYCLE], second, settings,
                                   group_id=f"{name}2-{unique}"))
    wait_parked(hop1, hop2)
    return TwoHops(hop1, hop2, seen, done)


def test_a_commit_wakes_the_parked_next_hop(
    base_settings: Settings, unique: str, producer: EventProducer,
    run_processor: Callable[[Processor], Processor],  # noqa: F811 (fixture from test_loop)
) -> None:
    """Two parked hops, probing only every 20 s: a submission goes through both at once,
    because each commit rings the next hop's doorbell."""
    settings = base_settings.model_copy(update={
        "idle_probe_s": PROBE_S, "poll_timeout_s": PROBE_S, "handoff_doorbell": True})
    hops = two_hops("bell", settings, unique, run_processor)
    hop1, hop2, seen, done = hops.first, hops.second, hops.seen, hops.done
    assert hop1._idle is not None and hop2._idle is not None
    probes = (hop1._idle.probes, hop2._idle.probes)

    sent = time.monotonic()
    producer.send([ev.TaskSubmitted(task_id=f"{unique}-1", team="a",
                                    spec=ev.TaskSpec(name="n", task_type="t", prompt="p"))])
    doorbell.ring(settings.kafka_bootstrap, [SUBMITTED])  # as the ingest API does

    # well inside the probe interval: only the doorbells can have woken the parked hops
    assert done.wait(HANDOFF_S), "the hand-off waited for the probe interval"
    assert seen[f"{unique}-1"] - sent < HANDOFF_S
    assert hop1._idle.rung >= 1 and hop2._idle.rung >= 1
    assert hop1._idle.probes > probes[0] and hop2._idle.probes > probes[1]


def test_a_ring_names_the_partitions_its_commit_wrote(unique: str) -> None:
    cluster = f"bell-{unique}:9092"
    bell = doorbell.Listener(cluster, ["tasks.routed", "tasks.lifecycle"])
    try:
        doorbell.ring(cluster, {"tasks.routed": [3], "tasks.lifecycle": [0, 5]})
        assert bell.wait(5.0)
        bell.drain()  # the second datagram may have come after the wait returned
        assert bell.take() == {("tasks.routed", 3), ("tasks.lifecycle", 0),
                               ("tasks.lifecycle", 5)}
        doorbell.ring(cluster, ["tasks.routed"])  # no partitions: every one
        assert bell.wait(5.0)
        assert bell.take() is None
        bell.wake()
        assert bell.wait(5.0)
        assert bell.take() is None
    finally:
        bell.close()


def test_a_woken_hop_probes_only_the_partitions_the_ring_named(
    base_settings: Settings, unique: str, producer: EventProducer,
    run_processor: Callable[[Processor], Processor],  # noqa: F811 (fixture from test_loop)
) -> None:
    """The upstream hop's commit names the one partition it wrote: the parked downstream hop
    assigns that one alone (not its six), and reads the record."""
    settings = base_settings.model_copy(update={
        "idle_probe_s": PROBE_S, "idle_full_probe_s": PROBE_S, "poll_timeout_s": PROBE_S})
    hops = two_hops("named", settings, unique, run_processor)
    hop2, done = hops.second, hops.done
    assert hop2._idle is not None and len(hop2._idle.parked) == 6
    probes, probed = hop2._idle.probes, hop2._idle.partitions_probed

    producer.send([ev.TaskSubmitted(task_id=f"{unique}-1", team="a",
                                    spec=ev.TaskSpec(name="n", task_type="t", prompt="p"))])
    doorbell.ring(settings.kafka_bootstrap, [SUBMITTED])  # as the ingest API does
    assert done.wait(HANDOFF_S), "the hand-off waited for the probe interval"
    wait_parked(hop2)
    assert hop2._idle.probes > probes
    # one partition per probe since the ring (the record's, and again after handling it)
    assert hop2._idle.partitions_probed - probed == hop2._idle.probes - probes


def test_a_record_no_ring_named_is_read_by_the_periodic_probe(
    base_settings: Settings, unique: str,
    run_processor: Callable[[Processor], Processor],  # noqa: F811 (fixture from test_loop)
) -> None:
    """Rings keep naming one partition (a busy upstream on this host) while a producer that
    rings nothing (another host, a plain Kafka client) writes to another: its record is read
    by the probe of every partition that comes idle_full_probe_s after the last one."""
    settings = base_settings.model_copy(update={
        "idle_probe_s": 0.05, "idle_full_probe_s": 0.5, "poll_timeout_s": 0.2})
    seen = threading.Event()

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id == f"{unique}-quiet":
            seen.set()
        return ()

    hop = run_processor(Processor(f"quiet-{unique}", [LIFECYCLE], handler, settings,
                                  group_id=f"quiet-{unique}"))
    wait_parked(hop)
    stop = threading.Event()

    def busy_upstream() -> None:
        while not stop.wait(0.01):
            doorbell.ring(settings.kafka_bootstrap, {LIFECYCLE: [0]})

    ringer = threading.Thread(target=busy_upstream, daemon=True)
    ringer.start()
    try:
        time.sleep(0.3)
        raw = ConfluentProducer(settings.producer_config())
        event = ev.TaskHeld(task_id=f"{unique}-quiet", team="a", reason="r")
        raw.produce(LIFECYCLE, value=default_serde().encode(event), partition=3,
                    key=event.task_id.encode())
        raw.flush(10)
        assert seen.wait(30), "a record on a partition no ring named was never read"
    finally:
        stop.set()
        ringer.join(5)
    assert hop._idle is not None and hop._idle.rung > 0


def test_a_listener_whose_queue_filled_up_probes_every_partition(unique: str) -> None:
    """Rings beyond the socket's queue are dropped by the kernel: what they named is unknown,
    so a drain that found the queue full names every partition."""
    cluster = f"bell-{unique}:9092"
    bell = doorbell.Listener(cluster, ["tasks.routed"])
    try:
        for p in range(doorbell.QUEUE_LIMIT + 5):
            doorbell.ring(cluster, {"tasks.routed": [p]})
        assert bell.wait(5.0)
        assert bell.take() is None
        doorbell.ring(cluster, {"tasks.routed": [1]})
        assert bell.wait(5.0)
        assert bell.take() == {("tasks.routed", 1)}
    finally:
        bell.close()
