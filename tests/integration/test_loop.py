"""The consume-transform-produce loop on the real broker: outputs, DLQ, retries, checkpoints."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from fleetplane.core import events as ev
from fleetplane.core.errors import Retriable
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import Processor, Record
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import DLQ, LIFECYCLE, SUBMITTED, TopicSpec, ensure_topics


def spec() -> ev.TaskSpec:
    return ev.TaskSpec(name="n", task_type="t", prompt="p")


def read_all(settings: Settings, topic: str, want: int, timeout_s: float = 90.0,
             match: str = "") -> list[tuple[bytes | None, bytes, dict[str, bytes]]]:
    """Read a topic from the start (read_committed) until `want` records containing `match`."""
    c = Consumer({**settings.consumer_config(f"reader-{time.monotonic_ns()}"),
                  "enable.auto.commit": False})
    c.subscribe([topic])
    out: list[tuple[bytes | None, bytes, dict[str, bytes]]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < want and time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error() or match.encode() not in (m.value() or b"") + (m.key() or b""):
                    continue
                out.append((m.key(), m.value() or b"", dict(m.headers() or [])))
    finally:
        c.close()
    return out


@pytest.fixture
def run_processor() -> Iterator[Callable[[Processor], Processor]]:
    """Start processors in threads; stop them (as SIGTERM would) at the end of the test."""
    started: list[tuple[Processor, threading.Thread]] = []

    def start(p: Processor) -> Processor:
        t = threading.Thread(target=p.run, daemon=True)
        t.start()
        started.append((p, t))
        return p

    yield start
    for p, _ in started:
        p.stop()  # rings the loop's own doorbell: a parked loop stops at once
    for _, t in started:
        t.join(15)


@pytest.mark.parametrize("transactional", [False, True], ids=["at-least-once", "exactly-once"])
def test_handler_outputs_and_bad_records_to_dlq(
    base_settings: Settings, unique: str, run_processor: Callable[[Processor], Processor],
    producer: EventProducer, transactional: bool,
) -> None:
    settings = base_settings.model_copy(update={"transactional": transactional})

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if not event.task_id.startswith(unique):
            return  # the session broker's tasks.submitted also holds other tests' records
        assert isinstance(event, ev.TaskSubmitted)
        if event.spec.prompt == "explode":
            raise ValueError("prompt may not explode")
        yield event.derive(ev.TaskHeld, reason=f"held-{unique}")

    run_processor(Processor(f"test-{unique}", [SUBMITTED], handler, settings,
                            group_id=f"g-{unique}"))
    good = [ev.TaskSubmitted(task_id=f"{unique}-{i}", team="a", spec=spec()) for i in range(20)]
    bad = ev.TaskSubmitted(task_id=f"{unique}-bad", team="a",
                           spec=spec().model_copy(update={"prompt": "explode"}))
    producer.send([*good[:10], bad, *good[10:]])
    raw = Producer(settings.producer_config())
    raw.produce(SUBMITTED, key=f"{unique}-garbage".encode(), value=b"not avro at all",
                headers=[("origin", b"test")])
    raw.flush(10)

    held = read_all(settings, LIFECYCLE, 20, match=f"held-{unique}")
    serde = default_serde()
    mine = sorted(t for t in (serde.decode(v).task_id for _, v, _ in held) if t.startswith(unique))
    assert mine == sorted(e.task_id for e in good)

    dlq = [serde.decode(v) for _, v, _ in read_all(settings, DLQ, 2, match=unique)]
    by_key = {d.task_id: d for d in dlq if isinstance(d, ev.DeadLetter)}
    assert "prompt may not explode" in by_key[f"{unique}-bad"].reason
    garbage = by_key[f"{unique}-garbage"]
    assert "single-object" in garbage.reason
    assert garbage.payload == b"not avro at all"
    assert garbage.headers["origin"] == b"test"
    assert garbage.source_topic == SUBMITTED


def test_retriable_errors_are_retried_then_succeed(
    base_settings: Settings, unique: str, run_processor: Callable[[Processor], Processor],
    producer: EventProducer,
) -> None:
    calls: dict[str, int] = {}

    def flaky(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        calls[event.task_id] = calls.get(event.task_id, 0) + 1
        if event.task_id.startswith(unique) and calls[event.task_id] < 3:
            raise Retriable("dependency down")
        return [event.derive(ev.TaskHeld, reason=f"ok-{unique}")]

    from fleetplane.core.errors import RetryPolicy

    run_processor(Processor(f"flaky-{unique}", [SUBMITTED], flaky, base_settings,
                            group_id=f"g-{unique}",
                            retry=RetryPolicy(initial_interval_s=0.01, maximum_attempts=5)))
    producer.send(
        [ev.TaskSubmitted(task_id=f"{unique}-r", team="a", spec=spec())])
    out = read_all(base_settings, LIFECYCLE, 1, match=f"{unique}-r")
    assert [default_serde().decode(v).task_id for _, v, _ in out] == [f"{unique}-r"]
    assert calls[f"{unique}-r"] == 3


def test_offsets_survive_a_restart_without_reprocessing(
    base_settings: Settings, unique: str, producer: EventProducer
) -> None:
    """A second processor in the same group resumes after the first one's checkpoint."""
    seen: list[str] = []

    def record(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        seen.append(event.task_id)
        return []

    producer.send([ev.TaskSubmitted(task_id=f"{unique}-a{i}", team="a", spec=spec())
                   for i in range(5)])
    for round_ in range(2):
        p = Processor(f"restart-{unique}", [SUBMITTED], record, base_settings,
                      group_id=f"g-{unique}")
        t = threading.Thread(target=p.run, daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        want = 5 * (round_ + 1)
        while sum(1 for s in seen if s.startswith(unique)) < want and time.monotonic() < deadline:
            time.sleep(0.1)
        p.stop()
        t.join(15)
        if round_ == 0:
            producer.send([ev.TaskSubmitted(task_id=f"{unique}-b{i}", team="a", spec=spec())
                           for i in range(5)])
    mine = [s for s in seen if s.startswith(unique)]
    assert sorted(mine) == sorted([f"{unique}-a{i}" for i in range(5)]
                                  + [f"{unique}-b{i}" for i in range(5)])


def test_inputs_read_until_says_how_far_behind_the_loop_is(
    base_settings: Settings, unique: str, run_processor: Callable[[Processor], Processor],
) -> None:
    """The coordinator's clock stamps its ticks with how far its repartition step has read
    (Processor.inputs_read_until_ms): caught up, it is now; while the loop is stuck on a
    record with newer records waiting, it stays at the stuck record's time."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"until-{unique}"
    admin = AdminClient({"bootstrap.servers": base_settings.kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        fut.result(30)
    gate, entered = threading.Event(), threading.Event()

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id.endswith("-block"):
            entered.set()
            gate.wait(60)
        return []

    p = run_processor(Processor(f"until-{unique}", [topic], handler, base_settings,
                                group_id=f"g-{unique}"))
    raw = Producer(base_settings.producer_config())
    serde = default_serde()

    def send(task_id: str) -> None:
        raw.produce(topic, key=task_id.encode(),
                    value=serde.encode(ev.TaskSubmitted(task_id=task_id, team="a", spec=spec())))
        raw.flush(10)

    def caught_up_since(t_ms: int) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            until = p.inputs_read_until_ms()
            if until is not None and until >= t_ms:
                return True
            time.sleep(0.05)
        return False

    send(f"{unique}-first")
    assert caught_up_since(int(time.time() * 1000))
    blocked_at = int(time.time() * 1000)
    send(f"{unique}-block")
    assert entered.wait(60)
    for i in range(10):
        send(f"{unique}-after-{i}")
    time.sleep(1.0)  # the fetcher sees the newer records; the loop is still stuck
    until = p.inputs_read_until_ms()
    # (0: a partition whose position is not known yet also counts as behind)
    assert until is not None and until < blocked_at + 1000, (until, blocked_at)
    gate.set()
    assert caught_up_since(int(time.time() * 1000))


def test_inputs_behind_an_open_transaction_are_not_read_to_the_end(
    base_settings: Settings, unique: str, run_processor: Callable[[Processor], Processor],
) -> None:
    """A producer killed mid-transaction leaves it open until its restart aborts it; a
    read_committed loop then stops at the last stable offset, reports end-of-partition there and
    parks, while committed records after the open transaction wait. That is not "read to the
    end": the coordinator would otherwise judge executors silent whose heartbeats sit behind it
    (chaos run: a completed attempt declared lost and run twice)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"lso-{unique}"
    admin = AdminClient({"bootstrap.servers": base_settings.kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        fut.result(30)
    seen: list[str] = []
    p = run_processor(Processor(f"lso-{unique}", [topic], lambda e, r: seen.append(e.task_id)
                                or [], base_settings, group_id=f"g-{unique}"))
    serde = default_serde()

    def value(task_id: str) -> bytes:
        return serde.encode(ev.TaskSubmitted(task_id=task_id, team="a", spec=spec()))

    def transactional(txn_id: str) -> Producer:
        prod = Producer({**base_settings.producer_config(), "transactional.id": txn_id})
        prod.init_transactions(30)
        return prod

    def until_at_least(t_ms: int, within_s: float) -> int | None:
        deadline = time.monotonic() + within_s
        until = p.inputs_read_until_ms()
        while time.monotonic() < deadline:
            until = p.inputs_read_until_ms()
            if until is not None and until >= t_ms:
                break
            time.sleep(0.05)
        return until

    committer = transactional(f"{unique}-committer")
    committer.begin_transaction()
    committer.produce(topic, key=b"k", value=value(f"{unique}-first"))
    committer.commit_transaction(30)
    t_ms = int(time.time() * 1000)
    until = until_at_least(t_ms, 60)
    assert until is not None and until >= t_ms, "read to the end: now"
    assert seen == [f"{unique}-first"]

    dead = transactional(f"{unique}-dead")  # opens a transaction and never ends it
    dead.begin_transaction()
    dead.produce(topic, key=b"k", value=value(f"{unique}-open"))
    dead.flush(30)
    opened_at = int(time.time() * 1000)
    committer.begin_transaction()
    committer.produce(topic, key=b"k", value=value(f"{unique}-after"))
    committer.commit_transaction(30)
    time.sleep(5.0)  # end-of-partition at the stable offset; the loop parks
    sampled_at = int(time.time() * 1000)
    until = p.inputs_read_until_ms()
    assert seen == [f"{unique}-first"], "records after the open transaction are not visible"
    # it stopped moving around the time the transaction opened (give a loaded machine 3 s to
    # notice the new high watermark); read to the end, it would be about now
    assert until is not None and until < sampled_at - 2000, (until, opened_at, sampled_at)

    restarted = transactional(f"{unique}-dead")  # the restart fences and aborts it
    restarted.begin_transaction()
    restarted.commit_transaction(30)
    t_ms = int(time.time() * 1000)
    until = until_at_least(t_ms, 60)
    assert until is not None and until >= t_ms, "read to the end again once it is aborted"
    assert seen == [f"{unique}-first", f"{unique}-after"]


def test_before_commit_publishes_one_summary_per_transaction(
    base_settings: Settings, unique: str, run_processor: Callable[[Processor], Processor],
    producer: EventProducer,
) -> None:
    """A summary of the whole batch (the router's statistics) is published once per
    checkpoint, in its transaction, not once per input: 60 inputs sent at once give fewer
    summaries than inputs, and the last committed summary counts all 60."""
    settings = base_settings.model_copy(update={"transactional": True})
    counted = {"n": 0, "published": 0}

    def count(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id.startswith(f"{unique}-"):
            counted["n"] += 1
        return []

    def summary() -> list[ev.Event]:
        if counted["n"] == counted["published"]:
            return []
        counted["published"] = counted["n"]
        return [ev.TaskHeld(task_id=f"sum{unique}", team="a", reason=f"count={counted['n']}")]

    run_processor(Processor(f"sum-{unique}", [SUBMITTED], count, settings,
                            group_id=f"g-{unique}", before_commit=summary))
    producer.send([ev.TaskSubmitted(task_id=f"{unique}-{i}", team="a", spec=spec())
                   for i in range(60)])
    deadline = time.monotonic() + 60
    while counted["published"] < 60 and time.monotonic() < deadline:
        time.sleep(0.1)
    out = read_all(settings, LIFECYCLE, 1, match="count=60")
    summaries = read_all(settings, LIFECYCLE, 60, timeout_s=3.0, match=f"sum{unique}")
    reasons = [getattr(default_serde().decode(v), "reason", "") for _, v, _ in summaries]
    assert out and reasons[-1] == "count=60"
    assert 1 <= len(reasons) < 60


def test_a_kafka_client_error_in_the_handler_stops_the_loop_and_dead_letters_nothing(
    base_settings: Settings, unique: str, producer: EventProducer,
) -> None:
    """A dead producer inside a handler (the executor's live channel after a broker restart) is
    not the input's fault: the loop stops without committing (the process restarts) and the
    record is handled again, never dead-lettered (the chaos run's dispatches went to the DLQ)."""
    from confluent_kafka import KafkaError, KafkaException

    from fleetplane.core.errors import Fatal

    broken = [True]

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if not event.task_id.startswith(unique):
            return []
        if broken[0]:
            raise KafkaException(KafkaError(KafkaError._FATAL, "Unable to produce message"))
        return [event.derive(ev.TaskHeld, reason=f"redone-{unique}")]

    settings = base_settings.model_copy(update={"transactional": True})
    producer.send([ev.TaskSubmitted(task_id=f"{unique}-k", team="a", spec=spec())])
    first = Processor(f"kx-{unique}", [SUBMITTED], handler, settings, group_id=f"g-{unique}")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            first.run()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the loop went on after the client error"
    assert errors and isinstance(errors[0], Fatal), errors

    broken[0] = False  # the restarted process has a working client
    second = Processor(f"kx-{unique}", [SUBMITTED], handler, settings, group_id=f"g-{unique}")
    t2 = threading.Thread(target=second.run, daemon=True)
    t2.start()
    try:
        out = read_all(settings, LIFECYCLE, 1, match=f"redone-{unique}")
        assert [default_serde().decode(v).task_id for _, v, _ in out] == [f"{unique}-k"]
    finally:
        second.stop()
        t2.join(15)
    dead = read_all(settings, DLQ, 1, timeout_s=3, match=f"{unique}-k")
    assert dead == [], (unique, dead)


def test_records_a_fetch_skipped_are_read_again_when_the_input_is_read_uncommitted(
    base_settings: Settings, unique: str, run_processor: Callable[[Processor], Processor],
    producer: EventProducer,
) -> None:
    """An input read uncommitted has no offset gaps but transaction markers; a batch that
    starts past records never read (quiet chaos run Q3 of stop 18: the coordinator's schedule
    step went on 405 records further and never applied them) makes the loop read them again.
    The skip is made here by moving the consumer 50 records ahead from the handler."""
    topic = f"gaps-{unique}"
    ensure_topics(base_settings.client_config(), [TopicSpec(topic, "task_id", 1, 1, -1,
                                                            "delete")])
    # the handler moves the fetch position (a seek), which needs the partition assigned: not
    # parked while the batch is handled
    settings = base_settings.model_copy(update={"batch_size": 5,
                                                "idle_park_while_handling": False})
    raw = Producer(settings.producer_config())
    serde = default_serde()
    for i in range(100):
        e = ev.TaskSubmitted(task_id=f"{unique}-{i}", team="a", spec=spec())
        raw.produce(topic, key=e.task_id.encode(), value=serde.encode(e))
    assert raw.flush(30) == 0
    handled: set[int] = set()
    jumped: list[int] = []

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        handled.add(rec.offset)
        if rec.offset == 7 and not jumped:  # the fetch position moves past 50 records
            jumped.append(rec.offset)
            assert proc.consumer is not None
            proc.consumer.seek(TopicPartition(topic, 0, 60))
        return []

    proc = run_processor(Processor(f"gaps-{unique}", [topic], handler, settings,
                                   group_id=f"g-{unique}", transactional=True,
                                   isolation="read_uncommitted"))
    deadline = time.monotonic() + 60
    while len(handled) < 100 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert jumped == [7]
    assert sorted(handled) == list(range(100)), sorted(set(range(100)) - handled)


@pytest.mark.parametrize("transactional", [False, True], ids=["at-least-once", "exactly-once"])
def test_a_drained_batch_is_handled_with_the_inputs_parked(
    base_settings: Settings, unique: str, run_processor: Callable[[Processor], Processor],
    producer: EventProducer, transactional: bool,
) -> None:
    """While it handles a batch that drained what the client had fetched, the loop's consumer
    holds no assignment (the client does not fetch back to back meanwhile: IdleBackoff.
    park_for_work); records that arrive during the handling are read after it, once each."""
    settings = base_settings.model_copy(update={"transactional": transactional})
    assigned_while_handling: list[int] = []
    warmed_up, first_handled = threading.Event(), threading.Event()
    holder: list[Processor] = []

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        if event.task_id == f"{unique}-warm-up":
            warmed_up.set()
            return
        if not event.task_id.startswith(unique):
            return
        consumer = holder[0].consumer
        assert consumer is not None
        assigned_while_handling.append(len(consumer.assignment()))
        if not first_handled.is_set():
            first_handled.set()
            time.sleep(0.5)  # the second lot arrives while this one is handled
        yield event.derive(ev.TaskHeld, reason=f"parked-{unique}")

    p = Processor(f"park-{unique}", [SUBMITTED], handler, settings, group_id=f"g-{unique}")
    holder.append(p)
    run_processor(p)
    # the group starts at the beginning of a topic other tests wrote: the backlog comes in full
    # batches, and a partition can only be parked once its position is known (a record or its
    # end read), so the lots below come once the loop has read everything up to a warm-up
    producer.send([ev.TaskSubmitted(task_id=f"{unique}-warm-up", team="a", spec=spec())])
    assert warmed_up.wait(60)
    time.sleep(1.0)  # every partition's end reported
    producer.send([ev.TaskSubmitted(task_id=f"{unique}-a{i}", team="a", spec=spec())
                   for i in range(5)])
    assert first_handled.wait(60)
    producer.send([ev.TaskSubmitted(task_id=f"{unique}-b{i}", team="a", spec=spec())
                   for i in range(5)])
    out = read_all(settings, LIFECYCLE, 10, match=f"parked-{unique}")
    assert sorted(default_serde().decode(v).task_id for _, v, _ in out) == sorted(
        [f"{unique}-a{i}" for i in range(5)] + [f"{unique}-b{i}" for i in range(5)])
    assert len(assigned_while_handling) == 10
    assert set(assigned_while_handling) == {0}


def test_a_full_batch_is_handled_with_the_inputs_parked(
    base_settings: Settings, unique: str, run_processor: Callable[[Processor], Processor],
) -> None:
    """A batch as large as batch_size (the client may hold more records fetched behind it) is
    handled with the consumer holding no assignment too: in a burst the router's batches are
    full, and assigned it fetched back to back for seconds while it routed them (docs/
    benchmarks.md, stop 21). Every record is still handled once, in order."""
    topic = f"full-{unique}"
    ensure_topics(base_settings.client_config(), [TopicSpec(topic, "task_id", 1, 1, -1,
                                                            "delete")])
    settings = base_settings.model_copy(update={"batch_size": 3})
    ready = threading.Event()
    handled: list[tuple[int, int]] = []  # (offset, partitions assigned while handling it)
    holder: list[Processor] = []

    def handler(event: ev.Event, rec: Record) -> Iterable[ev.Event]:
        consumer = holder[0].consumer
        assert consumer is not None
        handled.append((rec.offset, len(consumer.assignment())))
        return []

    p = Processor(f"full-{unique}", [topic], handler, settings, group_id=f"g-{unique}",
                  on_assign=lambda _c, _parts: ready.set())
    holder.append(p)
    run_processor(p)
    assert ready.wait(60)
    time.sleep(1.0)  # the partition's end reported: its position is known, it can be parked
    raw = Producer(settings.producer_config())
    serde = default_serde()
    for i in range(10):  # one fetch brings them all: batches of 3, 3, 3 and 1
        e = ev.TaskSubmitted(task_id=f"{unique}-{i}", team="a", spec=spec())
        raw.produce(topic, key=e.task_id.encode(), value=serde.encode(e))
    assert raw.flush(30) == 0
    deadline = time.monotonic() + 60
    while len(handled) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [offset for offset, _ in handled] == list(range(10))
    assert {assigned for _, assigned in handled} == {0}, handled
