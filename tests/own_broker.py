"""Settings on an embedded broker of a test's own (topics created), for tests whose records must
not meet the session broker's: their ages, their doorbells, their consumer groups."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleetplane.core.doorbell import bell_dir
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ensure_topics, load_topics
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
