"""The router's start-up read (router.rebuild.read_messages) fails on a stalled read, not on a
long one: a fleet's tasks.outcomes keeps 90 days, and a router whose read had to end within
120 s could not start once the topic held more than that (docs/routing.md, "Restart")."""

from __future__ import annotations

import time

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from fleetplane.core.settings import Settings
from fleetplane.router.rebuild import read_messages


def test_a_read_longer_than_the_timeout_that_makes_progress_reads_everything(
        base_settings: Settings, unique: str) -> None:
    topic = f"rebuild-read-{unique}"
    admin = AdminClient(base_settings.client_config())
    for future in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        future.result(30)
    producer = Producer({**base_settings.client_config(), "linger.ms": 50})
    n = 150_000
    for i in range(n):
        producer.produce(topic, key=str(i % 97).encode(), value=b"x")
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0

    started = time.monotonic()
    got = sum(1 for _ in read_messages(base_settings, topic, timeout_s=0.1))
    took = time.monotonic() - started
    assert got == n
    assert took > 0.1, f"read in {took:.2f}s: too fast to show the timeout counts from progress"
