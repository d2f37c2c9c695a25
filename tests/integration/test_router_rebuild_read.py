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
    n = 20_000
    for i in range(n):
        producer.produce(topic, key=str(i % 97).encode(), value=b"x")
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0

    # The reader works on what it reads (here: 50 ms per 1,000 records), so the whole read
    # takes about 1 s, twice the timeout, on any machine; no gap between two fetches comes
    # near the timeout. (Until stop 33 the test relied on 150,000 records taking longer than
    # 0.1 s to read, which a fast moment of the CI machine did not: 0.09 s.)
    timeout_s = 0.5
    started = time.monotonic()
    got = 0
    for _ in read_messages(base_settings, topic, timeout_s=timeout_s):
        got += 1
        if got % 1_000 == 0:
            time.sleep(0.05)
    took = time.monotonic() - started
    assert got == n
    assert took > timeout_s, f"read in {took:.2f}s: not longer than the timeout"
