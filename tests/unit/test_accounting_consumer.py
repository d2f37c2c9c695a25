"""Accounting's consumer settings: a bounded prefetch with a short backoff (main.CONSUMER_TUNING),
for its consumer only, and never over what the operator configured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetplane.accounting.main import build_processor
from fleetplane.accounting.store import Store, connect
from fleetplane.core.settings import Settings


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = connect(Settings(clickhouse_dsn=f"chdb://{tmp_path / 'ch'}",
                         clickhouse_database="consumer_tuning"))
    yield s
    s.close()


def test_the_accounting_consumer_prefetches_a_bounded_number_of_records_per_partition(
        store: Store) -> None:
    processor, _ = build_processor(Settings(), store, group_id="g")
    consumer = processor.settings.consumer_config("g")
    assert consumer["queued.min.messages"] == "2000"
    assert consumer["fetch.queue.backoff.ms"] == "50"
    # consumer properties only: librdkafka warns when a producer is given them
    producer = processor.settings.producer_config()
    assert "queued.min.messages" not in producer
    assert "fetch.queue.backoff.ms" not in producer


def test_what_the_operator_configured_wins(store: Store) -> None:
    settings = Settings(kafka_config={"queued.min.messages": "500"},
                        kafka_consumer_config={"fetch.queue.backoff.ms": "5"})
    processor, _ = build_processor(settings, store, group_id="g")
    consumer = processor.settings.consumer_config("g")
    assert consumer["queued.min.messages"] == "500"
    assert consumer["fetch.queue.backoff.ms"] == "5"


def test_a_consumer_only_setting_reaches_consumers_and_not_producers() -> None:
    settings = Settings(kafka_consumer_config={"fetch.queue.backoff.ms": "7"})
    assert settings.consumer_config("g")["fetch.queue.backoff.ms"] == "7"
    assert "fetch.queue.backoff.ms" not in settings.producer_config()


def test_the_sink_probes_its_idle_inputs_at_its_own_slower_pace(store: Store) -> None:
    """Nothing waits on accounting's hand-off: between batches it fetches every sink_probe_s,
    not every idle_probe_s as the hops do (docs/accounting.md, "Consumer group")."""
    settings = Settings(sink_probe_s=0.4)
    processor, _ = build_processor(settings, store, group_id="g")
    assert processor.settings.idle_probe_s == 0.4
    assert Settings().sink_probe_s > Settings().idle_probe_s
