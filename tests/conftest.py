"""Shared fixtures: a real Kafka-protocol broker and a real ClickHouse engine.

Broker: FLEETPLANE_KAFKA_BOOTSTRAP when set; else, with FLEETPLANE_TESTCONTAINERS=1 and a Docker
daemon that answers, Apache Kafka and ClickHouse server in containers (testcontainers); else the
pinned broker (noida-db) started here on a free 127.0.0.1 port. ClickHouse:
FLEETPLANE_TEST_CLICKHOUSE_URL when set (the container sets it), else chdb in a temporary
directory. Containers are opt-in, not automatic: a CI machine with Docker but without a registry
to pull from must not turn red (docs/testing.md).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from fleetplane.core.doorbell import bell_dir
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


KAFKA_IMAGE = os.environ.get("FLEETPLANE_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.1")
CLICKHOUSE_IMAGE = os.environ.get("FLEETPLANE_TEST_CLICKHOUSE_IMAGE",
                                  "clickhouse/clickhouse-server:24.8")


def use_containers() -> bool:
    """FLEETPLANE_TESTCONTAINERS=1 and a Docker daemon that answers."""
    if os.environ.get("FLEETPLANE_TESTCONTAINERS") != "1":
        return False
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception as exc:
        pytest.exit(f"FLEETPLANE_TESTCONTAINERS=1 but no Docker daemon answers: {exc}", 2)
    return True


@pytest.fixture(scope="session", autouse=True)
def clickhouse_container() -> Iterator[None]:
    """ClickHouse server in a container for the session (opt-in, see the module doc): the
    accounting tests find it through FLEETPLANE_TEST_CLICKHOUSE_URL."""
    if os.environ.get("FLEETPLANE_TEST_CLICKHOUSE_URL") or not use_containers():
        yield
        return
    from testcontainers.community.clickhouse import ClickHouseContainer

    with ClickHouseContainer(CLICKHOUSE_IMAGE) as ch:
        host, port = ch.get_container_host_ip(), ch.get_exposed_port(8123)
        os.environ["FLEETPLANE_TEST_CLICKHOUSE_URL"] = (
            f"http://{ch.username}:{ch.password}@{host}:{port}")
        try:
            yield
        finally:
            os.environ.pop("FLEETPLANE_TEST_CLICKHOUSE_URL", None)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("FLEETPLANE_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    if use_containers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    broker = EmbeddedBroker(tmp_path_factory.mktemp("broker"))
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
        # the session's doorbells (core.doorbell): killed processes leave their sockets, and
        # no later session uses this broker's port-named folder
        shutil.rmtree(bell_dir(broker.bootstrap), ignore_errors=True)


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
