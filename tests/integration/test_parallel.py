"""core.parallel's ParallelProcessor on the real broker: records finish out of order, input
offsets are committed only up to the lowest unfinished one, partitions are paused while every
slot is busy and resumed after, and nothing is lost or handled twice across that."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from fleetplane.core import events as ev
from fleetplane.core.kafka import event_headers
from fleetplane.core.loop import Record
from fleetplane.core.parallel import ParallelProcessor
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import SUBMITTED

from .test_executor_process import start_group_at_end
from .test_loop import read_all


def spec() -> ev.TaskSpec:
    return ev.TaskSpec(name="n", task_type="t", prompt="p")


def send_to_partition(settings: Settings, task_ids: list[str], partition: int = 0) -> None:
    """TaskSubmitted events, all in one partition (in this order)."""
    p = Producer(settings.producer_config())
    serde = default_serde()
    for t in task_ids:
        e = ev.TaskSubmitted(task_id=t, team="a", spec=spec())
        p.produce(SUBMITTED, key=t.encode(), value=serde.encode(e), headers=event_headers(e),
                  partition=partition)
    assert p.flush(30) == 0


def committed(settings: Settings, group: str, partition: int = 0) -> int:
    c = Consumer({**settings.consumer_config(group), "enable.auto.commit": False})
    try:
        return int(c.committed([TopicPartition(SUBMITTED, partition)], timeout=10)[0].offset)
    finally:
        c.close()


def offset_of(settings: Settings, task_id: str, partition: int = 0) -> int:
    c = Consumer({**settings.consumer_config(f"find-{time.monotonic_ns()}"),
                  "enable.auto.commit": False})
    c.assign([TopicPartition(SUBMITTED, partition, 0)])
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if not m.error() and m.key() == task_id.encode():
                    return int(m.offset() or 0)
    finally:
        c.close()
    raise AssertionError(f"{task_id} not found")


@pytest.fixture
def started() -> Iterator[list[tuple[ParallelProcessor, threading.Thread]]]:
    running: list[tuple[ParallelProcessor, threading.Thread]] = []
    yield running
    for p, t in running:
        p.stop()
        t.join(20)


def start(p: ParallelProcessor, running: list[tuple[ParallelProcessor, threading.Thread]]) \
        -> threading.Thread:
    t = threading.Thread(target=p.run, daemon=True)
    t.start()
    running.append((p, t))
    return t


def test_out_of_order_completion_commits_up_to_lowest_unfinished(
        base_settings: Settings, unique: str,
        started: list[tuple[ParallelProcessor, threading.Thread]]) -> None:
    release = threading.Event()
    handled: list[str] = []

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if not event.task_id.startswith(unique):
            return []
        handled.append(event.task_id)
        if event.task_id.endswith("-slow"):
            release.wait(60)
        return [ev.TaskHeld(task_id=event.task_id, team="a", reason="done")]

    slow, fast = f"{unique}-slow", [f"{unique}-fast{i}" for i in range(5)]
    send_to_partition(base_settings, [slow, *fast])
    group = f"par-{unique}"
    p = ParallelProcessor(f"par-{unique}", [SUBMITTED], handler, base_settings, group_id=group,
                          slots=3, drain_timeout_s=0)
    t = start(p, started)
    # the five fast records finish (outputs committed) while the slow one still runs
    out = read_all(base_settings, "tasks.lifecycle", 5, timeout_s=40, match=f"{unique}-fast")
    assert len(out) == 5 and not release.is_set()
    slow_offset = offset_of(base_settings, slow)
    deadline = time.monotonic() + 10
    while committed(base_settings, group) != slow_offset and time.monotonic() < deadline:
        time.sleep(0.2)
    assert committed(base_settings, group) == slow_offset  # not past the unfinished record
    # stop without the slow one finishing (drain 0): a restart gets it again, not lost
    p.stop()
    t.join(20)
    release.set()
    handled.clear()
    p2 = ParallelProcessor(f"par-{unique}", [SUBMITTED], handler, base_settings, group_id=group,
                           slots=3)
    start(p2, started)
    out = read_all(base_settings, "tasks.lifecycle", 1, timeout_s=40, match=slow)
    assert out
    deadline = time.monotonic() + 20
    while committed(base_settings, group) <= offset_of(base_settings, fast[-1]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert committed(base_settings, group) > offset_of(base_settings, fast[-1])
    # redelivered from the lowest unfinished offset: the slow record is among the first three
    # started (three slots start at once, so which appends first is the threads' race)
    assert slow in handled[:3], handled


def test_pause_when_full_resume_when_free_nothing_lost_or_twice(
        base_settings: Settings, unique: str,
        started: list[tuple[ParallelProcessor, threading.Thread]]) -> None:
    handled: list[str] = []
    at: list[float] = []   # when each of this test's records was handled
    lock = threading.Lock()

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if not event.task_id.startswith(unique):
            return []
        time.sleep(0.02)
        with lock:
            handled.append(event.task_id)
            at.append(time.monotonic())
        return [ev.TaskHeld(task_id=event.task_id, team="a", reason="done")]

    ids = [f"{unique}-{i}" for i in range(60)]
    send_to_partition(base_settings, ids[:30], 1)
    send_to_partition(base_settings, ids[30:], 2)
    p = ParallelProcessor(f"pause-{unique}", [SUBMITTED], handler, base_settings,
                          group_id=f"pause-{unique}", slots=2, prefetch=1)
    start(p, started)
    deadline = time.monotonic() + 90
    while len(handled) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
        assert p.running_count() <= 2
    assert sorted(handled) == sorted(ids)  # all, once each
    # ~0.6 s of work: a resumed partition must not stall (librdkafka's fetcher waited up to 1 s
    # per resume before the seek in ParallelProcessor._pause: ~20 s for this test). Timed from
    # this test's first record: the group reads the topic from its start, and what the suite's
    # earlier tests wrote there comes first (alone 2 s, after the accounting tests 12-15 s)
    elapsed = at[-1] - at[0]
    assert elapsed < 12, elapsed
    assert p.stats.pauses > 0 and p.stats.peak_running == 2
    out = read_all(base_settings, "tasks.lifecycle", 60, timeout_s=30, match=f"{unique}-")
    assert len(out) == 60


def test_revocation_running_attempts_finish_and_nothing_is_lost(
        base_settings: Settings, unique: str,
        started: list[tuple[ParallelProcessor, threading.Thread]]) -> None:
    """A second member joins while the first runs attempts: what finished is committed, what
    runs on a revoked partition finishes and its outputs are still published, what had not
    started is read by the new owner. Every record's output appears (at least once)."""
    handled: dict[str, list[str]] = {}
    lock = threading.Lock()

    def handler_for(name: str) -> Callable[[ev.Event, Record], Iterable[ev.Event]]:
        def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
            if not event.task_id.startswith(unique):
                return []
            with lock:
                handled.setdefault(event.task_id, []).append(name)
            time.sleep(2.0 if "slow" in event.task_id else 0.05)
            return [ev.TaskHeld(task_id=event.task_id, team="a", reason="done")]
        return handler

    ids = [f"{unique}-slow{p}" for p in range(6)] + [f"{unique}-q{p}-{i}" for p in range(6)
                                                     for i in range(3)]
    for p in range(6):
        send_to_partition(base_settings, [i for i in ids if f"slow{p}" in i
                                          or f"-q{p}-" in i], p)
    group = f"rev-{unique}"
    one = ParallelProcessor(f"rev-{unique}", [SUBMITTED], handler_for("one"), base_settings,
                            group_id=group, slots=2, prefetch=2, instance_id=f"{group}-1")
    start(one, started)
    deadline = time.monotonic() + 30
    while sum(1 for v in handled.values() if "one" in v) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    two = ParallelProcessor(f"rev-{unique}", [SUBMITTED], handler_for("two"), base_settings,
                            group_id=group, slots=2, prefetch=2, instance_id=f"{group}-2")
    start(two, started)
    keys: set[str] = set()
    reader = Consumer({**base_settings.consumer_config(f"r-{unique}"), "enable.auto.commit": False})
    reader.subscribe(["tasks.lifecycle"])
    deadline = time.monotonic() + 50
    try:
        while keys != set(ids) and time.monotonic() < deadline:
            for m in reader.consume(500, 0.2):
                if not m.error() and (m.key() or b"").decode() in ids:
                    keys.add((m.key() or b"").decode())
    finally:
        reader.close()
    assert keys == set(ids)  # every record's output, committed
    assert set(handled) == set(ids)


def test_express_lane_answers_flagged_records_while_every_slot_is_busy(
        base_settings: Settings, unique: str,
        started: list[tuple[ParallelProcessor, threading.Thread]]) -> None:
    """Records flagged `urgent` (the executor: a dispatch whose task was cancelled before it
    started) are handled outside the slots, ahead of the queue; `promote` moves a waiting one
    there later (a cancel read after the dispatch was taken). Before, both waited behind the
    busy slot's record. Offsets stay committed only up to the unfinished record."""
    release = threading.Event()

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if not event.task_id.startswith(unique):
            return []
        if event.task_id.endswith("-busy"):
            release.wait(60)
        return [ev.TaskHeld(task_id=event.task_id, team="a", reason="done")]

    busy, waiting, urgent = f"{unique}-busy", f"{unique}-waiting", f"{unique}-urgent"
    group = f"par-{unique}"
    # the session broker holds every earlier test's submissions: with one slot, a new group
    # would work through them first (the fresh-clone CI run: 40 s were not enough)
    start_group_at_end(base_settings, group, SUBMITTED)
    send_to_partition(base_settings, [busy, waiting, urgent])
    p = ParallelProcessor(f"par-{unique}", [SUBMITTED], handler, base_settings, group_id=group,
                          slots=1, prefetch=4, drain_timeout_s=0,
                          urgent=lambda rec: rec.key == urgent.encode())
    start(p, started)
    try:
        assert read_all(base_settings, "tasks.lifecycle", 1, timeout_s=40, match=urgent)
        assert not read_all(base_settings, "tasks.lifecycle", 1, timeout_s=1, match=waiting)
        deadline = time.monotonic() + 30
        while not p.promote(waiting.encode()):  # once the loop has taken it
            assert time.monotonic() < deadline, "the waiting record was never taken"
            time.sleep(0.05)
        assert read_all(base_settings, "tasks.lifecycle", 1, timeout_s=40, match=waiting)
        assert p.stats.express == 2 and p.running_count() == 1  # the busy one still runs
        assert committed(base_settings, group) == offset_of(base_settings, busy)
    finally:
        release.set()
    assert read_all(base_settings, "tasks.lifecycle", 1, timeout_s=40, match=busy)


def test_a_burst_onto_free_slots_is_begun_by_the_poll_loop_then_each_record_handled_once(
        base_settings: Settings, unique: str,
        started: list[tuple[ParallelProcessor, threading.Thread]]) -> None:
    """The start hook (`begin`): records taken while slots are free are begun by the poll loop,
    before their slot threads handle them; a record a freed slot takes later is begun by that
    slot thread. Every record is begun once and handled once, begun first."""
    lock = threading.Lock()
    begun: dict[int, str] = {}  # offset -> the thread that began it
    order: list[tuple[str, int]] = []
    release = threading.Event()

    def begin(rec: Record) -> None:
        with lock:
            assert rec.offset not in begun, "begun twice"
            begun[rec.offset] = threading.current_thread().name
            order.append(("begin", rec.offset))

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        with lock:
            order.append(("handle", rec.offset))
        release.wait(30)
        return [ev.TaskHeld(task_id=event.task_id, team="a", reason="done")]

    group = f"par-{unique}"
    start_group_at_end(base_settings, group, SUBMITTED)
    first = [f"{unique}-a{i}" for i in range(6)]
    later = [f"{unique}-b{i}" for i in range(4)]
    send_to_partition(base_settings, first)
    p = ParallelProcessor(f"par-{unique}", [SUBMITTED], handler, base_settings, group_id=group,
                          slots=6, prefetch=6, drain_timeout_s=0, begin=begin)
    start(p, started)
    deadline = time.monotonic() + 40
    while len([o for o in order if o[0] == "handle"]) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    with lock:
        assert len(begun) == 6
        # every slot was free: the poll loop began them all (no slot thread did)
        assert not [t for t in begun.values() if "slot" in t], begun
    # every slot busy: these wait, and are begun by the slot threads that take them
    send_to_partition(base_settings, later)
    time.sleep(1.0)
    with lock:
        assert len(begun) == 6  # waiting records are not begun (they hold no slot yet)
    release.set()
    out = read_all(base_settings, "tasks.lifecycle", 10, timeout_s=40, match=unique)
    assert len(out) == 10
    with lock:
        assert len(begun) == 10
        assert [t for o, t in begun.items() if o >= max(begun) - 3 and "slot" in t]
        handles = [o for kind, o in order if kind == "handle"]
        assert sorted(handles) == sorted(begun)  # each handled once
        for off in begun:
            assert order.index(("begin", off)) < order.index(("handle", off))


def burst_of_six(base_settings: Settings, settings: Settings, unique: str, ids: list[str],
                 handler: Callable[[ev.Event, Record], Iterable[ev.Event]],
                 begin: Callable[[Record], ev.Event | None],
                 started: list[tuple[ParallelProcessor, threading.Thread]]) -> None:
    """Six dispatches `ids` sent at once to a ParallelProcessor with six free slots and the start
    hook `begin` (`settings`: the processor's); returns once all six outputs are committed."""
    group = f"par-{unique}"
    start_group_at_end(base_settings, group, SUBMITTED)
    send_to_partition(base_settings, ids)
    p = ParallelProcessor(f"par-{unique}", [SUBMITTED], handler, settings, group_id=group,
                          slots=6, prefetch=6, drain_timeout_s=0, begin=begin)
    start(p, started)
    out = read_all(base_settings, "tasks.lifecycle", 6, timeout_s=40, match=unique)
    assert len(out) == 6


def test_the_event_the_start_hook_decoded_is_handed_to_the_handler(
        base_settings: Settings, unique: str,
        started: list[tuple[ParallelProcessor, threading.Thread]]) -> None:
    """A record the start hook decoded is not decoded a second time for its handler: the
    handler gets the hook's event (the executor decoded each dispatch twice, once to claim the
    attempt and once to run it). A hook that returns None leaves the decoding to the loop."""
    serde = default_serde()
    lock = threading.Lock()
    decoded: dict[int, ev.Event] = {}
    handled: dict[int, ev.Event] = {}

    def begin(rec: Record) -> ev.Event | None:
        if rec.offset % 2:
            return None  # the loop decodes this one itself
        event = serde.decode(rec.value)
        with lock:
            decoded[rec.offset] = event
        return event

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        with lock:
            handled[rec.offset] = event
        return [ev.TaskHeld(task_id=event.task_id, team="a", reason="done")]

    ids = [f"{unique}-d{i}" for i in range(6)]
    burst_of_six(base_settings, base_settings, unique, ids, handler, begin, started)
    with lock:
        assert sorted(e.task_id for e in handled.values()) == sorted(ids)
        assert len(decoded) == 3
        for off, event in handled.items():
            if off in decoded:
                assert event is decoded[off]  # the hook's object, not a second decode
            else:
                assert event.task_id in ids  # decoded by the loop


def test_a_burst_the_client_fetched_ahead_is_all_begun_before_a_slot_thread_runs(
        base_settings: Settings, unique: str,
        started: list[tuple[ParallelProcessor, threading.Thread]]) -> None:
    """A burst onto free slots larger than one take (here: batch_size 3, six records the client
    fetched at once) is begun whole by the poll loop before any slot thread handles a record of
    it: the loop takes again what the client already holds before it wakes the slots. Before,
    the slot threads woken after the first take held the GIL while the rest of the burst sat
    fetched in the client (docs/executor.md, stop 19)."""
    lock = threading.Lock()
    order: list[tuple[str, int]] = []

    def begin(rec: Record) -> None:
        time.sleep(0.01)  # a claim's work: long enough for a woken slot thread to run
        with lock:
            order.append(("begin", rec.offset))

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        with lock:
            order.append(("handle", rec.offset))
        return [ev.TaskHeld(task_id=event.task_id, team="a", reason="done")]

    burst_of_six(base_settings, base_settings.model_copy(update={"batch_size": 3}), unique,
                 [f"{unique}-a{i}" for i in range(6)], handler, begin, started)
    with lock:
        kinds = [kind for kind, _ in order]
    assert kinds == ["begin"] * 6 + ["handle"] * 6, order


def test_a_commit_made_right_after_a_take_is_made_with_the_inputs_parked(
        base_settings: Settings, unique: str,
        started: list[tuple[ParallelProcessor, threading.Thread]]) -> None:
    """The poll loop parks its inputs once it has taken and begun what the client fetched: the
    commit that follows (here: record a's outcome, committed right after b was taken) is made
    with the consumer holding no assignment. Assigned, the client fetched back to back through
    each take and commit of a burst (docs/benchmarks.md, stop 21). Both outcomes are
    committed."""
    settings = base_settings.model_copy(update={"transactional": True})
    assigned, a_started, b_taken = threading.Event(), threading.Event(), threading.Event()
    at_commit: list[int] = []  # partitions assigned at each commit
    holder: list[ParallelProcessor] = []

    class Sink:
        def flush(self) -> None:  # by the poll loop, in each commit, before its transaction
            consumer = holder[0].consumer
            assert consumer is not None
            at_commit.append(len(consumer.assignment()))

    def begin(rec: Record) -> None:
        if rec.key == f"{unique}-b".encode():  # a finishes while b is taken
            b_taken.set()
            deadline = time.monotonic() + 30
            while holder[0].stats.finished < 1 and time.monotonic() < deadline:
                time.sleep(0.01)

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id == f"{unique}-a":
            a_started.set()
            b_taken.wait(60)
        return [ev.TaskHeld(task_id=event.task_id, team="a", reason="done")]

    group = f"par-{unique}"
    start_group_at_end(settings, group, SUBMITTED)
    p = ParallelProcessor(f"par-{unique}", [SUBMITTED], handler, settings, group_id=group,
                          slots=2, drain_timeout_s=0, begin=begin, sink=Sink(),
                          on_assign=lambda _c, _parts: assigned.set())
    holder.append(p)
    start(p, started)
    assert assigned.wait(60)
    time.sleep(1.0)  # every partition's end reported: positions known, the inputs can park
    send_to_partition(settings, [f"{unique}-a"])
    assert a_started.wait(60)
    time.sleep(0.2)  # the loop is idle again before b comes
    send_to_partition(settings, [f"{unique}-b"])
    out = read_all(settings, "tasks.lifecycle", 2, timeout_s=40, match=unique)
    assert sorted(default_serde().decode(v).task_id for _, v, _ in out) == [
        f"{unique}-a", f"{unique}-b"]
    assert at_commit and set(at_commit) == {0}, at_commit
