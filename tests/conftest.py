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
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ensure_topics, load_topics
from fleetplane.infra.broker import EmbeddedBroker

# Property tests: no per-example deadline (a loaded 2-core machine makes timings meaningless);
# in CI (CI=true) the examples are derandomized, so a red run is reproducible and a bug shows up
# as a change that turns CI red, not as a coin flip. Locally they stay random, to find new bugs.
hypothesis_settings.register_profile(
    "dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")


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
