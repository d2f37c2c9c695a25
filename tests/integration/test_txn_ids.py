"""A loop restarted after its predecessor died mid-transaction writes records that consumers
which had read up to the end read (core.txn_ids).

On the embedded broker, every record a producer id writes after one of its transactions was
aborted on a partition is skipped by read_committed consumers that fetch from past the abort
marker: in the chaos run the coordinator, accounting and the router went blind to whole
partitions after a service restart. The loop now writes under a new generation of its
transactional id after a restart or an abort."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fleetplane.core import events as ev
from fleetplane.core.loop import Output, Processor, RawRecord, Record
from fleetplane.core.settings import Settings
from fleetplane.core.txn_ids import FENCE_AHEAD, TxnIds


def _topics(settings: Settings, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(n, 1, 1) for n in names]).values():
        fut.result(30)


def _reader(settings: Settings, topic: str, unique: str) -> Consumer:
    c = Consumer({**settings.consumer_config(f"reader-{unique}"), "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    return c


def _read(c: Consumer, until: float, want: int = 1) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < want and time.monotonic() < until:
        m = c.poll(0.2)
        if m is not None and not m.error():
            got.append(m.value() or b"")
    return got


def test_generations_continue_past_what_a_predecessor_registered(base_settings: Settings,
                                                                 unique: str) -> None:
    stable = f"gen-{unique}"
    first = TxnIds(base_settings)
    a, b = first.next_id(stable), first.next_id(stable)
    assert a != b and a.startswith(f"{stable}.g") and b.startswith(f"{stable}.g")
    assert TxnIds(base_settings).latest(stable) == int(b.rsplit(".g", 1)[1])
    # a restarted process: a new generation beyond any its predecessor may have used
    c = TxnIds(base_settings).next_id(stable)
    assert int(c.rsplit(".g", 1)[1]) == int(b.rsplit(".g", 1)[1]) + FENCE_AHEAD + 1


def test_a_loop_restarted_after_a_crash_mid_transaction_is_read_by_caught_up_consumers(
        base_settings: Settings, unique: str) -> None:
    source, sink = f"txi-in-{unique}", f"txi-out-{unique}"
    _topics(base_settings, source, sink)
    stable = f"txi-{unique}"

    # the predecessor: its loop's producer wrote into a transaction and the process died
    # (SIGKILL) before the commit; the open transaction holds the sink partition
    zombie = Producer(base_settings.producer_config(TxnIds(base_settings).next_id(stable)))
    zombie.init_transactions(30)
    zombie.begin_transaction()
    zombie.produce(sink, key=b"k", value=b"never committed", partition=0)
    zombie.flush(30)

    reader = _reader(base_settings, sink, unique)
    assert _read(reader, time.monotonic() + 1.0) == []  # held by the open transaction

    def handler(event: ev.Event, rec: Record) -> Iterable[Output]:
        return [RawRecord(sink, rec.key, b"out:" + event.task_id.encode(), 0, ())]

    loop = Processor("txi", [source], handler, base_settings, group_id=f"txi-{unique}",
                     instance_id=stable, transactional=True)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        # the restarted loop fences its predecessor: the broker aborts the open transaction
        # and the reader reads past the abort marker (nothing to deliver)
        deadline = time.monotonic() + 60
        tp = TopicPartition(sink, 0)
        while time.monotonic() < deadline:
            reader.poll(0.2)
            if reader.position([tp])[0].offset >= 2:
                break
        assert reader.position([tp])[0].offset >= 2, "the open transaction was not aborted"

        events = [ev.TaskSubmitted(task_id=f"{unique}-{i}", team="a",
                                   spec=ev.TaskSpec(name="n", task_type="t", prompt="p"))
                  for i in range(3)]
        feed = Producer(base_settings.producer_config())
        for e in events:
            feed.produce(source, key=e.task_id.encode(), value=_encode(e), partition=0)
        feed.flush(30)

        got = _read(reader, time.monotonic() + 60, want=3)
        assert sorted(got) == sorted(b"out:" + e.task_id.encode() for e in events)
    finally:
        loop.stop()
        thread.join(30)
        reader.close()


def _encode(event: ev.Event) -> bytes:
    from fleetplane.core.serde import default_serde

    return default_serde().encode(event)
