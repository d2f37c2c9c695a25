"""The service's sink inserts on its own thread while the loop decodes the next batch
(sink.py, "Background inserts"), on the real broker and a real ClickHouse engine (chdb):
nothing is lost or counted twice, a bad record is still dead-lettered with its reason, and an
insert that fails on the insert thread stops the loop before its offsets are stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Producer

from fleetplane.accounting import queries
from fleetplane.accounting.main import build_processor
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.accounting.store import Store, apply_ddl
from fleetplane.core import events as ev
from fleetplane.core.errors import RetryPolicy
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import Processor
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import topic_for
from tests.integration.test_accounting import ch_store, wait_for  # noqa: F401 (fixture)
from tests.integration.test_accounting_rollups import fleet, rounded


@pytest.fixture
def store(ch_store: Store, unique: str) -> Store:  # noqa: F811
    """A database of its own, so no other processor of the module writes these rows."""
    own = ch_store.with_database(f"bg_{unique}")
    apply_ddl(own)
    return own


def start(settings: Settings, store: Store, group: str, retry: RetryPolicy | None = None
          ) -> tuple[Processor, ClickHouseSink, threading.Thread, list[Any]]:
    """The service's processor (build_processor: background inserts), small flushes so many
    of them are in flight while the loop works; the exception it stopped on, if any."""
    processor, sink = build_processor(
        settings.model_copy(update={"clickhouse_database": store.database,
                                    "sink_flush_rows": 150}), store, group_id=group)
    if retry is not None:
        sink.retry = retry
    raised: list[Any] = []

    def run() -> None:
        try:
            processor.run()
        except Exception as exc:   # the Fatal the test provokes
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return processor, sink, thread, raised


def stop(processor: Processor, thread: threading.Thread) -> None:
    processor.stop()
    thread.join(60)
    assert not thread.is_alive()


def dead_letters(store: Store, task_id: str) -> list[Any]:
    return store.query_rows(f"SELECT payload FROM {store.table('events')} "
                            "WHERE event_type = 'DeadLetter' AND task_id = {t:String}",
                            {"t": task_id})


def calls_of(store: Store, teams: list[str]) -> int:
    return int(store.command(f"SELECT count() FROM {store.table('model_calls')} "
                             "WHERE team IN {teams:Array(String)}", {"teams": teams}))


def assert_rollups_equal_raw(store: Store, teams: list[str]) -> None:
    for team in teams:
        for by in ("team", "model", "task_type"):
            assert rounded(queries.cost_by(store, by, team=team), by) == rounded(
                queries.cost_by_raw(store, by, team=team), by)


@pytest.fixture
def events(unique: str) -> Iterator[list[ev.Event]]:
    yield fleet(120, seed=5, prefix=f"bg{unique}")


@pytest.fixture
def teams(events: list[ev.Event]) -> list[str]:
    return sorted({e.team for e in events})


def test_background_inserts_store_every_row_once_and_dead_letter_a_bad_record(
    store: Store, base_settings: Settings, producer: EventProducer, events: list[ev.Event],
    teams: list[str], unique: str,
) -> None:
    calls = [e for e in events if isinstance(e, ev.ModelCall)]
    # a value no column holds: the batch is redone record by record, this one dead-lettered
    bad = ev.ModelCall.model_construct(**{**calls[0].model_dump(), "event_id": f"bad-{unique}",
                                          "input_tokens": -5})
    raw = Producer(base_settings.producer_config())
    raw.produce(topic_for(bad), key=bad.task_id.encode(), value=default_serde().encode(bad))
    raw.flush(10)
    producer.send(events)
    producer.send(calls[:40])   # delivered twice
    processor, sink, thread, raised = start(base_settings, store, f"bg-{unique}")
    try:
        wait_for(lambda: calls_of(store, teams) >= len(calls), what="the model calls")
        wait_for(lambda: dead_letters(store, bad.task_id), what="the dead letter")
    finally:
        stop(processor, thread)
    assert not raised and sink.stats.flushes > 3
    assert calls_of(store, teams) == len(calls)
    [[payload]] = dead_letters(store, bad.task_id)
    assert "input_tokens=-5" in payload   # the reason names the column and the value
    assert int(store.command(f"SELECT count() FROM {store.table('model_calls')} "
                             "WHERE event_id = {e:String}", {"e": bad.event_id})) == 0
    assert_rollups_equal_raw(store, teams)


def test_an_insert_failing_on_the_insert_thread_stops_the_loop_before_offsets_are_stored(
    store: Store, base_settings: Settings, producer: EventProducer, events: list[ev.Event],
    teams: list[str], unique: str,
) -> None:
    table = store.table("events")
    # every events insert fails in ClickHouse (the table is there: the block is serialized on
    # the loop's thread, the statement fails on the insert thread)
    store.command(f"ALTER TABLE {table} ADD CONSTRAINT refuse CHECK event_id = ''")
    producer.send(events)
    processor, _sink, thread, raised = start(
        base_settings, store, f"bg-{unique}",
        retry=RetryPolicy(initial_interval_s=0.01, maximum_attempts=1))
    thread.join(120)
    assert not thread.is_alive() and raised, "the loop stops on the insert thread's failure"
    # (the flush's other tables may have gone in before `events`: the restart below must not
    # count them twice; whether the first flush held model calls depends on the first batch)
    store.command(f"ALTER TABLE {table} DROP CONSTRAINT refuse")

    # The same group again: no offset was stored, so everything comes back, once per row.
    processor, _sink, thread, raised = start(base_settings, store, f"bg-{unique}")
    calls = [e for e in events if isinstance(e, ev.ModelCall)]
    try:
        wait_for(lambda: calls_of(store, teams) >= len(calls), what="the model calls")
        time.sleep(1)   # a checkpoint or two after the last call (nothing more must come)
    finally:
        stop(processor, thread)
    assert not raised
    assert calls_of(store, teams) == len(calls)
    assert int(store.command(f"SELECT count() FROM {table} WHERE team IN {{teams:Array(String)}}",
                             {"teams": teams})) == len({e.event_id for e in events})
    assert_rollups_equal_raw(store, teams)
