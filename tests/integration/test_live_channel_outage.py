"""The executor's live channel after a broker crash: the embedded broker loses about the last
second of the writes it acknowledged when it is SIGKILLed. An attempt's outcome committed before
the crash (or settled before the outage was noticed) then claims an audit event the log no
longer has: the CI chaos run's "0 audit events, the outcome recorded 1". Every audit event
acknowledged shortly before an outage is published again once the outage is seen, so every
acknowledged audit event is on its topic after the restart. A broker of its own: the test kills
it."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from fleetplane.core import events as ev
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ensure_topics, load_topics, topic_for
from fleetplane.executor.runtime import LiveEmitter
from fleetplane.infra.broker import EmbeddedBroker

TOPICS = Path(__file__).resolve().parents[2] / "infra" / "topics.yaml"


def _call(i: int) -> ev.ModelCall:
    spec = ev.TaskSpec(name="t", task_type="codegen", prompt="p")
    d = ev.TaskDispatched(task_id=f"t-{i}", team="a", spec=spec, attempt=1, model="m",
                          provider="anthropic", tier="small", action="run", inputs={})
    return d.derive(ev.ModelCall, event_id=f"outage-{uuid.uuid4().hex}", attempt=1,
                    call_index=0, model="m", provider="anthropic", tier="small",
                    input_tokens=10, output_tokens=5, cost_usd=0.001, latency_ms=100.0,
                    outcome="ok")


def _ids_on(topic: str, bootstrap: str) -> set[str]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    serde = default_serde()
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {}
        for p in parts:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        ids: set[str] = set()
        done: set[int] = {p for p, h in ends.items() if h == 0}
        deadline = time.monotonic() + 60
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error() is not None:
                    continue
                ids.add(serde.decode(msg.value()).event_id)
                if msg.offset() + 1 >= ends[msg.partition()]:
                    done.add(msg.partition())
        return ids
    finally:
        consumer.close()


def test_audit_events_acknowledged_before_a_broker_crash_are_on_the_log_after_it(
        tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "broker")
    bootstrap = broker.start()
    port = broker.port
    settings = Settings(kafka_bootstrap=bootstrap)
    ensure_topics(settings.client_config(), load_topics(TOPICS))
    live = LiveEmitter(settings)
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def emit_steadily() -> None:  # as running attempts do: one audit event after another
        i = 0
        while not stop.is_set():
            call = _call(i)
            i += 1
            live.emit(call, keep=True)
            if not live.settle({call.event_id}, timeout_s=0.2):
                with lock:
                    acked.append(call.event_id)
            time.sleep(0.005)

    worker = threading.Thread(target=emit_steadily, daemon=True)
    worker.start()
    try:
        time.sleep(3.0)
        with lock:
            before_kill = len(acked)
        assert before_kill > 50, "the live channel acknowledged too little to test anything"
        pid = broker.pid
        assert pid is not None
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # as a host crash or the OOM killer would
        broker.stop()
        time.sleep(1.0)
        broker = EmbeddedBroker(tmp_path / "broker", port=port)
        broker.start()
        time.sleep(3.0)
        stop.set()
        worker.join(10)
        time.sleep(2.0)  # the outage answered 1 s after it was last seen, then delivered
        live.close()
        on_log = _ids_on(topic_for(_call(0)), bootstrap)
        with lock:
            missing = [e for e in acked if e not in on_log]
        assert live.resent > 0, "the outage was not noticed"
        assert not missing, (f"{len(missing)} of {len(acked)} acknowledged audit events are "
                             f"not on the log after the broker crash")
    finally:
        stop.set()
        broker.stop()
