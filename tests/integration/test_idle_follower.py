"""The idle backoff (core.loop.IdleBackoff) and the per-process follower (core.follower.Follower)
on the real broker: a consumer that went idle parks its partitions (unassigns them) and still
picks up a record that arrives later; parked partitions come back at their committed position;
nothing is lost or repeated across many park/probe cycles. Behaviour, not timings: each test
waits for the consumer to be parked (what it reports), then checks what was delivered."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fleetplane.core import events as ev
from fleetplane.core.follower import Follower
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import IdleBackoff, Processor, Record
from fleetplane.core.settings import Settings

PARTITIONS = 3


def wait_for(pred: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def idle_settings(base_settings: Settings) -> Settings:
    return base_settings.model_copy(update={"idle_backoff_s": 0.2, "idle_probe_s": 0.02})


@pytest.fixture
def topic(base_settings: Settings, unique: str) -> str:
    name = f"idle-{unique}"
    admin = AdminClient(base_settings.client_config())
    for fut in admin.create_topics([NewTopic(name, PARTITIONS, 1)]).values():
        fut.result(30)
    return name


def produce(settings: Settings, topic: str, values: Iterable[str]) -> None:
    p = Producer(settings.producer_config())
    for v in values:
        p.produce(topic, key=v.encode(), value=v.encode())
    assert p.flush(30) == 0


class Got:
    """What a follower's reader received, in order, thread-safe."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, msg: Message) -> None:
        with self.lock:
            self.values.append((msg.value() or b"").decode())

    def snapshot(self) -> list[str]:
        with self.lock:
            return list(self.values)


@pytest.fixture
def follower(idle_settings: Settings, unique: str) -> Iterator[Follower]:
    f = Follower(idle_settings, f"test-{unique}")
    yield f
    f.close()


def parked(f: Follower) -> bool:
    return f.idle is not None and f.idle.idle


def test_follower_picks_up_records_arriving_while_parked_nothing_lost_or_twice(
        idle_settings: Settings, topic: str, follower: Follower) -> None:
    produce(idle_settings, topic, [f"old-{i}" for i in range(5)])
    everything, recent = Got(), Got()
    from_start = follower.follow("all", [topic], everything)
    since = follower.follow("recent", [topic], recent, since_s=600)
    follower.start()
    assert from_start.ready.wait(60) and since.ready.wait(60)
    # ready means caught up: what the topic held is there, once
    assert sorted(everything.snapshot()) == [f"old-{i}" for i in range(5)]
    sent: list[str] = []
    for burst in range(5):  # a record on an idle input, five times over
        wait_for(lambda: parked(follower), "the follower to park its partitions")
        batch = [f"b{burst}-{i}" for i in range(7)]
        produce(idle_settings, topic, batch)
        sent += batch
        wait_for(lambda want=set(sent): want <= set(everything.snapshot()),  # type: ignore[misc]
                 f"burst {burst}")
    assert follower.idle is not None and follower.idle.probes > 0  # it did park and probe
    got = everything.snapshot()
    assert sorted(got) == sorted([f"old-{i}" for i in range(5)] + sent)  # none twice
    wait_for(lambda: set(sent) <= set(recent.snapshot()), "the since_s reader")
    assert sorted(recent.snapshot()) == sorted(everything.snapshot())  # all were recent


def test_parked_partitions_come_back_at_their_committed_position(
        idle_settings: Settings, topic: str, unique: str) -> None:
    """A group member consumes and commits, goes idle (its partitions unassigned), and when it
    wakes every partition is assigned again at the committed offset: the next record read is
    the one after the last committed, nothing skipped or repeated."""
    c = Consumer({**idle_settings.consumer_config(f"g-idle-{unique}"),
                  "enable.auto.commit": False, "enable.partition.eof": True,
                  "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    idle = IdleBackoff(c, idle_settings.idle_backoff_s, idle_settings.idle_probe_s)
    try:
        produce(idle_settings, topic, [f"first-{i}" for i in range(9)])
        seen: list[tuple[int, int, str]] = []

        def take(n: int) -> None:
            deadline = time.monotonic() + 60
            while len(seen) < n:
                assert time.monotonic() < deadline, seen
                msg = idle.poll(0.1)
                if msg is not None and msg.error() is None:
                    seen.append((msg.partition() or 0, msg.offset() or 0,
                                 (msg.value() or b"").decode()))
                    c.commit(message=msg, asynchronous=False)

        take(9)
        wait_for(lambda: (idle.poll(0.05), idle.idle)[1], "the consumer to park")
        assert c.assignment() == []  # parked: nothing fetched at all
        committed = {tp.partition: tp.offset for tp in c.committed(
            [TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=30)}
        produce(idle_settings, topic, [f"second-{i}" for i in range(6)])
        take(15)  # the probe assigns the parked partitions again and reads on
        second = seen[9:]
        assert sorted(v for _, _, v in second) == sorted(f"second-{i}" for i in range(6))
        # each partition continued exactly at its committed offset: nothing skipped, no repeat
        for p in {p for p, _, _ in second}:
            first = min(o for q, o, _ in second if q == p)
            assert first == max(committed.get(p, 0), 0), (p, first, committed)
        assert len({(p, o) for p, o, _ in seen}) == 15
    finally:
        c.close()


def test_processor_idle_between_bursts_handles_every_record_once_across_a_restart(
        idle_settings: Settings, unique: str, producer: EventProducer) -> None:
    """core.loop's Processor (every service's loop) with the backoff: records arriving after
    idle spells are all handled, once, and a restarted member starts at the committed
    position (the parked partitions' offsets were stored, not lost)."""
    from fleetplane.core.topics import SUBMITTED

    handled: list[str] = []
    lock = threading.Lock()

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id.startswith(unique):
            with lock:
                handled.append(event.task_id)
        return []

    def start() -> tuple[Processor, threading.Thread]:
        p = Processor(f"idle-{unique}", [SUBMITTED], handler, idle_settings,
                      group_id=f"g-proc-{unique}")
        t = threading.Thread(target=p.run, daemon=True)
        t.start()
        return p, t

    def submitted(name: str) -> ev.TaskSubmitted:
        return ev.TaskSubmitted(task_id=f"{unique}-{name}", team="a",
                                spec=ev.TaskSpec(name="n", task_type="t", prompt="p"))

    proc, thread = start()
    sent: list[str] = []
    try:
        for burst in range(4):
            if burst:
                wait_for(lambda: proc._idle is not None and proc._idle.idle,
                         "the processor to park")
            batch = [submitted(f"{burst}-{i}") for i in range(5)]
            producer.send(batch)
            sent += [e.task_id for e in batch]
            wait_for(lambda want=set(sent): want <= set(handled),  # type: ignore[misc]
                     f"burst {burst} handled")
        wait_for(lambda: proc._idle is not None and proc._idle.idle, "the processor to park")
    finally:
        proc.stop()
        thread.join(30)
    assert sorted(handled) == sorted(sent)  # each once
    before = len(handled)
    proc, thread = start()
    try:
        late = submitted("late")
        producer.send([late])
        wait_for(lambda: late.task_id in handled, "the record after the restart")
        time.sleep(1.0)  # anything re-read from an old position would arrive with it
    finally:
        proc.stop()
        thread.join(30)
    assert handled[before:] == [late.task_id]
