"""Settings on an embedded broker of a test's own (topics created), for tests whose records must
not meet the session broker's: their ages, their doorbells, their consumer groups; and events
published with the age a test gives them."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from fleetplane.core import events as ev
from fleetplane.core.doorbell import bell_dir
from fleetplane.core.kafka import event_headers
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ensure_topics, key_for, load_topics, topic_for
from fleetplane.infra.broker import EmbeddedBroker


@contextmanager
def settings_on_own_broker(data_dir: Path, **overrides: Any) -> Iterator[Settings]:
    """A broker in `data_dir`, the project's topics on it, and Settings pointing there (with
    `overrides`); stopped afterwards, its doorbell folder removed."""
    broker = EmbeddedBroker(data_dir)
    broker.start()
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap, **overrides)
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        yield settings
    finally:
        broker.stop()
        shutil.rmtree(bell_dir(broker.bootstrap), ignore_errors=True)


def publish_aged(settings: Settings, events: list[ev.Event], age_s: float) -> None:
    """`events` on their topics with the headers a service writes and a timestamp (CreateTime)
    `age_s` seconds ago: history as old as the test needs."""
    serde, producer = default_serde(), Producer(settings.producer_config())
    at = int((time.time() - age_s) * 1000)
    for e in events:
        producer.produce(topic_for(e), key=key_for(e), value=serde.encode(e),
                         headers=event_headers(e), timestamp=at)
    assert producer.flush(10) == 0
