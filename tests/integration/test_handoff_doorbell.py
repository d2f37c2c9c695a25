"""Hand-off doorbells (core.doorbell): a commit wakes the parked consumers of its topics.

The hops run on a broker of their own: on the session broker, records that earlier tests left
flowing into tasks.lifecycle kept the second hop working, so the test's ring came while it
worked and its probes were not the ones these tests count (docs/testing.md, stop 27)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pytest
from confluent_kafka import Producer as ConfluentProducer

from fleetplane.core import doorbell
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import Processor, Record
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import LIFECYCLE, SUBMITTED
from tests.integration.test_loop import run_processor  # noqa: F401  (the fixture)
from tests.own_broker import settings_on_own_broker

#: the parked hops' probe interval: longer than any test, so no periodic probe can read the
#: test's record; the loops still stop at once (stop() rings their own doorbell)
PROBE_S = 600.0
#: well inside the probe interval: a hand-off later than this was not the doorbell's
HANDOFF_S = 10.0


@pytest.fixture(scope="module")
def base_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings on this module's own broker (overrides the session's: see the module doc)."""
    with settings_on_own_broker(tmp_path_factory.mktemp("doorbell-broker")) as settings:
        yield settings


@pytest.fixture
def producer(base_settings: Settings) -> Iterator[EventProducer]:
    """An event producer on this module's broker."""
    p = EventProducer(base_settings)
    yield p
    p.close()


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
    """Two parked hops that probe only every PROBE_S: a submission goes through both at once,
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


def test_a_hop_rung_while_it_works_probes_what_it_worked_and_what_was_rung(
    base_settings: Settings, unique: str, producer: EventProducer,
    run_processor: Callable[[Processor], Processor],  # noqa: F811 (fixture from test_loop)
) -> None:
    """A busy upstream rings while the hop is handling the last batch: those rings are drained
    after the work, and they keep the input counted as rung, so the probe after each batch
    looks at the partition that had records and the one rung (one here), not at all six;
    every partition is still probed each idle_full_probe_s."""
    full_probe_s = 1.0
    settings = base_settings.model_copy(update={
        "idle_probe_s": full_probe_s, "idle_full_probe_s": full_probe_s,
        "poll_timeout_s": full_probe_s})
    handled: list[str] = []

    def slow(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id.startswith(unique):
            # slower than the records come (every 20 ms): the hop stays behind, and every
            # ring after the first comes while it works
            time.sleep(0.022)
            handled.append(event.task_id)
        return ()

    hop = run_processor(Processor(f"busy-{unique}", [LIFECYCLE], slow, settings,
                                  group_id=f"busy-{unique}"))
    wait_parked(hop)
    assert hop._idle is not None
    raw = ConfluentProducer(settings.producer_config())
    serde = default_serde()
    probes, probed = hop._idle.probes, hop._idle.partitions_probed
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < 4.0:  # a record every 20 ms, each rung, partition 2
        event = ev.TaskHeld(task_id=f"{unique}-{sent}", team="a", reason="r")
        raw.produce(LIFECYCLE, value=serde.encode(event), partition=2,
                    key=event.task_id.encode())
        raw.flush(10)
        doorbell.ring(settings.kafka_bootstrap, {LIFECYCLE: [2]})
        sent += 1
        time.sleep(0.02)
    deadline = time.monotonic() + 30
    while len(handled) < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert len(handled) == sent
    batches = hop._idle.probes - probes
    assert batches >= 15, "the hop was not kept busy"
    # one partition per probe, but all six at the periodic probe (at most once per
    # full_probe_s, one in hand) and at the probe after its batch (a batch that did not take
    # all the periodic probe fetched looks at every partition again); before stop 27 every
    # probe after a batch assigned all six once the last ring that found the hop parked was
    # full_probe_s old
    full_probes = 2 * (elapsed / full_probe_s + 1)
    assert hop._idle.partitions_probed - probed <= batches + 5 * full_probes


def quiet_backoff(base_settings: Settings) -> Settings:
    """The shipped probe interval and quiet backoff (20 ms doubling to 0.5 s), a full probe
    every 0.1 s while rings come."""
    return base_settings.model_copy(update={
        "idle_probe_s": 0.02, "idle_full_probe_s": 0.1, "idle_quiet_probe_s": 0.5,
        "poll_timeout_s": 0.1})


def write_unannounced(raw: ConfluentProducer, task_id: str, partition: int) -> None:
    """A TaskHeld onto tasks.lifecycle through a plain Kafka client: no doorbell rings."""
    event = ev.TaskHeld(task_id=task_id, team="a", reason="r")
    raw.produce(LIFECYCLE, value=default_serde().encode(event), partition=partition,
                key=task_id.encode())
    raw.flush(10)


class WaitAtRecord:
    """A handler noting the loop's probe wait (IdleBackoff.wait_s) when `task_id`'s record is
    read; `hop` is set once the loop exists."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.hop: Processor | None = None
        self.waits: list[float] = []
        self.seen = threading.Event()

    def __call__(self, event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id == self.task_id:
            assert self.hop is not None and self.hop._idle is not None
            self.waits.append(self.hop._idle.wait_s)  # as the record was read
            self.seen.set()
        return ()


def test_a_quiet_hop_probes_less_and_less_often_and_a_record_still_reaches_it(
    base_settings: Settings, unique: str,
    run_processor: Callable[[Processor], Processor],  # noqa: F811 (fixture from test_loop)
) -> None:
    """Nothing rings and nothing comes: the wait between probes doubles up to
    idle_quiet_probe_s instead of probing every idle_probe_s; a record that no ring announced
    is still read by the next probe, and resets the wait."""
    settings = quiet_backoff(base_settings)
    handler = WaitAtRecord(f"{unique}-quiet")
    hop = handler.hop = run_processor(Processor(f"calm-{unique}", [LIFECYCLE], handler,
                                                settings, group_id=f"calm-{unique}"))
    wait_parked(hop)
    assert hop._idle is not None
    time.sleep(1.5)  # quiet for QUIET_AFTER_S (0.1 s), then the wait grows: 20, 40 ... 500 ms
    probes = hop._idle.probes
    time.sleep(3.0)
    # every 500 ms: 6 in 3 s (every 20 ms it was 150); one more for a probe in hand
    assert hop._idle.probes - probes <= 7
    assert hop._idle.wait_s == 0.5

    write_unannounced(ConfluentProducer(settings.producer_config()), f"{unique}-quiet", 4)
    assert handler.seen.wait(HANDOFF_S), "a record no ring announced was never read"
    assert handler.waits == [settings.idle_probe_s]  # the record reset the wait


def write_between_probes(hop: Processor, raw: ConfluentProducer, task_id: str) -> None:
    """write_unannounced, at least 0.2 s before the hop's next probe is due (so, once its
    probes have backed off), so that the record is found by what the test means to find it:
    a ring, or that probe."""
    assert hop._idle is not None
    deadline = time.monotonic() + HANDOFF_S
    while hop._idle.probed_at + hop._idle.wait_s - time.monotonic() < 0.2:
        assert time.monotonic() < deadline, "the hop's probes never backed off"
        time.sleep(0.01)
    write_unannounced(raw, task_id, 4)


def test_an_input_with_unannounced_records_keeps_the_short_probe_through_a_quiet_spell(
    base_settings: Settings, unique: str,
    run_processor: Callable[[Processor], Processor],  # noqa: F811 (fixture from test_loop)
) -> None:
    """A loop configured as ingest's: a record that a probe found without a ring (a plain
    Kafka client, e.g. a direct submission to tasks.submitted) keeps the input's probes at
    idle_probe_s for ingest_unannounced_window_s, so the next such record after a quiet spell
    is read within a probe, not up to idle_quiet_probe_s later. A record announced by a ring
    does not: the input still backs off when quiet."""
    settings = quiet_backoff(base_settings).model_copy(update={"idle_quiet_probe_s": 2.0})
    assert settings.ingest_unannounced_window_s >= 60
    handler = WaitAtRecord(f"{unique}-direct")
    hop = handler.hop = run_processor(Processor(  # configured as ingest's loop is
        f"intake-{unique}", [LIFECYCLE], handler, settings, group_id=f"intake-{unique}",
        unannounced_window_s=settings.ingest_unannounced_window_s))
    wait_parked(hop)
    assert hop._idle is not None
    raw = ConfluentProducer(settings.producer_config())
    time.sleep(1.5)  # quiet, nothing seen yet: backed off (20, 40 ... 640 ms)
    assert hop._idle.wait_s > 0.3

    # announced: written, then rung (as every loop and the API do); the ring's probe reads it
    write_between_probes(hop, raw, f"{unique}-announced")
    doorbell.ring(settings.kafka_bootstrap, {LIFECYCLE: [4]})
    wait_parked(hop)
    time.sleep(1.5)
    assert hop._idle.unannounced_at == float("-inf")
    assert hop._idle.wait_s > 0.3, "an announced record kept the short probe"

    # unannounced: found by the next probe, which resets the wait and keeps it short
    write_between_probes(hop, raw, f"{unique}-direct")
    assert handler.seen.wait(HANDOFF_S), "a record no ring announced was never read"
    probes = hop._idle.probes
    time.sleep(1.5)  # as quiet as before
    assert hop._idle.wait_s == settings.idle_probe_s
    # every 20 ms: about 75 (backed off, 0.64 s doubling to 2 s: at most 3)
    assert hop._idle.probes - probes >= 10


def test_with_no_unannounced_window_an_input_backs_off_after_any_record(
    base_settings: Settings, unique: str,
    run_processor: Callable[[Processor], Processor],  # noqa: F811 (fixture from test_loop)
) -> None:
    """Every other loop (``idle_unannounced_window_s``, 0 by default): the quiet backoff as
    before stop 32, also after a record that no ring announced."""
    settings = quiet_backoff(base_settings)
    assert settings.idle_unannounced_window_s == 0
    handler = WaitAtRecord(f"{unique}-direct")
    hop = handler.hop = run_processor(Processor(
        f"nowindow-{unique}", [LIFECYCLE], handler, settings, group_id=f"nowindow-{unique}"))
    wait_parked(hop)
    assert hop._idle is not None
    write_between_probes(hop, ConfluentProducer(settings.producer_config()), f"{unique}-direct")
    assert handler.seen.wait(HANDOFF_S), "a record no ring announced was never read"
    time.sleep(1.5)
    assert hop._idle.wait_s == settings.idle_quiet_probe_s


def test_a_stream_no_ring_announces_keeps_the_short_probe(
    base_settings: Settings, unique: str,
    run_processor: Callable[[Processor], Processor],  # noqa: F811 (fixture from test_loop)
) -> None:
    """Records a plain Kafka client writes (no ring) every 50 ms: the probes between them
    find nothing, but the input is not quiet, so the wait stays at idle_probe_s and each
    record is read within one probe interval. (Backing off after any empty probe made such a
    stream wait 20-30 ms longer per hop at p50: docs/benchmarks.md, stop 28.)"""
    settings = quiet_backoff(base_settings)
    read = threading.Event()
    count = [0]
    total = 20

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id.startswith(f"{unique}-stream-"):
            count[0] += 1
            if count[0] == total:
                read.set()
        return ()

    hop = run_processor(Processor(f"stream-{unique}", [LIFECYCLE], handler, settings,
                                  group_id=f"stream-{unique}"))
    wait_parked(hop)
    assert hop._idle is not None
    raw = ConfluentProducer(settings.producer_config())
    waits: list[float] = []
    for i in range(total):
        write_unannounced(raw, f"{unique}-stream-{i}", i % 6)
        if i == 0:  # the stream starts: the hop parked before it may have backed off
            deadline = time.monotonic() + HANDOFF_S
            while count[0] < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            continue
        sent = time.monotonic()
        while time.monotonic() - sent < 0.05:
            waits.append(hop._idle.wait_s)
            time.sleep(0.005)
    assert read.wait(HANDOFF_S), f"{count[0]} of {total} records read"
    assert hop._idle.rung == 0  # nothing rang: every record was found by a probe
    assert max(waits) == settings.idle_probe_s, sorted(set(waits))


def test_an_event_producer_rings_the_partitions_it_wrote(
        base_settings: Settings, producer: EventProducer) -> None:
    """send() returns once the broker acknowledged the events, and rings the listeners of the
    partitions they went to (as a loop's commit does)."""
    bell = doorbell.Listener(base_settings.kafka_bootstrap, [LIFECYCLE])
    try:
        event = ev.TaskHeld(task_id="bell-sent", team="a", reason="r")
        producer.send([event])
        assert bell.wait(5.0)
        named = bell.take()
        assert named is not None and len(named) == 1
        ((topic, _partition),) = named
        assert topic == LIFECYCLE
    finally:
        bell.close()
