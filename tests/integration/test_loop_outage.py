"""A transaction does not span a broker outage (core.loop.Processor._on_producer_error).

On the embedded broker, a transaction with records written both before and after a broker
restart leaves its partitions' last stable offset stuck for good: its commit succeeds, yet no
read_committed consumer reads past it, nor what other producers commit after it (the chaos
run's planned broker restart stopped the whole pipeline that way). The loop aborts such a
transaction and reads its inputs again instead. A broker of its own: the test restarts it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fleetplane.core import events as ev
from fleetplane.core.loop import Processor, RawRecord, Record
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.infra.broker import EmbeddedBroker

IN, OUT = "outage-in", "outage-out"


def _committed_task_ids(bootstrap: str, within_s: float, want: int) -> list[str]:
    serde = default_serde()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{time.time()}",
                  "isolation.level": "read_committed", "enable.auto.commit": False})
    c.assign([TopicPartition(OUT, 0, 0)])
    seen: list[str] = []
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline and len(seen) < want:
            for m in c.consume(100, 0.5):
                if not m.error():
                    seen.append(serde.decode(m.value() or b"").task_id)
    finally:
        c.close()
    return seen


def test_a_transaction_open_across_a_broker_restart_is_aborted_and_redone(
        tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "broker")
    bootstrap = broker.start()
    try:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for fut in admin.create_topics([NewTopic(IN, 1, 1), NewTopic(OUT, 1, 1)]).values():
            fut.result(30)
        settings = Settings(kafka_bootstrap=bootstrap, transactional=True)
        serde = default_serde()

        def handler(event: ev.Event, rec: Record) -> Iterable[RawRecord]:
            return [RawRecord(OUT, rec.key, rec.value, 0, ())]

        # one transaction for everything read in 20 s: it is open when the broker restarts
        loop = Processor("outage", [IN], handler, settings, group_id="outage",
                         commit_interval_s=20.0, commit_when_drained=False)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        raw = Producer({"bootstrap.servers": bootstrap})

        def submit(task_id: str) -> None:
            e = ev.TaskSubmitted(task_id=task_id, team="a",
                                 spec=ev.TaskSpec(name="n", task_type="summarize", prompt="p"))
            raw.produce(IN, key=task_id.encode(), value=serde.encode(e))
            assert raw.flush(30) == 0

        submit("before")
        deadline = time.monotonic() + 60
        while loop.processed < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.processed == 1, "read and produced in the open transaction"
        broker.stop()
        time.sleep(1.0)
        broker.start()
        submit("after")
        seen = _committed_task_ids(bootstrap, 90, 2)
        assert sorted(set(seen)) == ["after", "before"], seen
        loop.stop()
        thread.join(30)
    finally:
        broker.stop()
