"""Shared fixtures: a real Kafka-protocol broker and a real ClickHouse engine.

Broker: FLEETPLANE_KAFKA_BOOTSTRAP when set, else the pinned broker (noida-db) started here on a
free 127.0.0.1 port. ClickHouse: FLEETPLANE_TEST_CLICKHOUSE_URL when set, else chdb in a
temporary directory. (testcontainers is used by neither: no Docker daemon answers on the machines
this project runs on; see docs/testing.md.)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ensure_topics, load_topics
from fleetplane.infra.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("FLEETPLANE_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    broker = EmbeddedBroker(tmp_path_factory.mktemp("broker"))
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def base_settings(kafka_bootstrap: str) -> Settings:
    settings = Settings(kafka_bootstrap=kafka_bootstrap)
    ensure_topics(settings.client_config(), load_topics(settings.topics_file))
    return settings


@pytest.fixture
def producer(base_settings: Settings) -> Iterator[EventProducer]:
    """An event producer on the test broker (waits for acknowledgements)."""
    p = EventProducer(base_settings)
    yield p
    p.close()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for group ids, task ids and teams of one test."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def chdb_dir(tmp_path: Path) -> Path:
    return tmp_path / "clickhouse"
