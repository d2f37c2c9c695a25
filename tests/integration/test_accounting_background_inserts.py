"""The service's sink inserts on its own thread while the loop decodes the next batch, and the
loop's checkpoints store offsets only up to the lowest record whose rows are not yet inserted
(sink.py, "Background inserts"; core.loop.PipelinedSink), on the real broker and a real
ClickHouse engine (chdb): nothing is lost or counted twice, a bad record is still dead-lettered
with its reason, an insert that fails on the insert thread stops the loop, and a loop that dies
while an insert hangs has stored no offset past it.
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
from fleetplane.accounting.rows import EVENTS, MODEL_CALLS
from fleetplane.accounting.schema import apply_ddl
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.accounting.store import Store
from fleetplane.core import events as ev
from fleetplane.core.errors import Fatal, RetryPolicy
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


def start(settings: Settings, store: Store, group: str, retry: RetryPolicy | None = None,
          flush_rows: int = 150, gate: threading.Event | None = None,
          ) -> tuple[Processor, ClickHouseSink, threading.Thread, list[Any]]:
    """The service's processor (build_processor: background inserts), small flushes so many
    of them are in flight while the loop works; the exception it stopped on, if any. With a
    `gate`, the insert thread's first hand-off waits for it and then fails (Fatal), as an
    insert that hangs and then gives up would."""
    processor, sink = build_processor(
        settings.model_copy(update={"clickhouse_database": store.database,
                                    "sink_flush_rows": flush_rows}), store, group_id=group)
    assert sink._inserter is not None, "the service's sink inserts in the background"
    if retry is not None:
        sink.retry = retry
    if gate is not None:
        def hang_then_fail(blocks: Any) -> None:
            gate.wait(60)
            raise Fatal("the insert gave up")
        sink._insert_all = hang_then_fail  # type: ignore[method-assign]
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
    assert isinstance(raised[0], Fatal) and "insert into events" in str(raised[0])
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


def test_a_loop_that_dies_while_an_insert_hangs_stored_no_offset_past_it(
    store: Store, base_settings: Settings, producer: EventProducer, events: list[ev.Event],
    teams: list[str], unique: str,
) -> None:
    """Checkpoints go on while the first hand-off hangs (the loop does not wait for it), and
    they store offsets only up to its rows: when it fails and the loop stops, the next process
    of the group reads those records again and stores every row once."""
    producer.send(events)
    gate = threading.Event()
    processor, _sink, thread, raised = start(base_settings, store, f"bg-{unique}",
                                             flush_rows=100_000, gate=gate)
    wait_for(lambda: processor.processed >= len(events), what="every record handled")
    time.sleep(1.5)   # three checkpoints (0.5 s) while the hand-off hangs
    assert thread.is_alive() and not raised, "the loop went on while the insert hung"
    assert calls_of(store, teams) == 0
    gate.set()   # the insert fails: the loop stops at its next checkpoint
    thread.join(60)
    assert not thread.is_alive() and isinstance(raised[0], Fatal)

    processor, _sink, thread, raised = start(base_settings, store, f"bg-{unique}")
    calls = [e for e in events if isinstance(e, ev.ModelCall)]
    try:
        wait_for(lambda: calls_of(store, teams) >= len(calls), what="the model calls")
        time.sleep(1)
    finally:
        stop(processor, thread)
    assert not raised
    assert calls_of(store, teams) == len(calls)
    assert_rollups_equal_raw(store, teams)


def test_a_hand_off_reports_the_lowest_offset_not_yet_inserted(store: Store) -> None:
    """ClickHouseSink.hand_off: per partition, the lowest source offset of rows in flight or
    buffered; nothing once they are inserted."""
    sink = ClickHouseSink(store, flush_rows=100_000, background=True)
    gate = threading.Event()
    real = sink._insert_all

    def gated(blocks: Any) -> None:
        gate.wait(30)
        real(blocks)

    sink._insert_all = gated  # type: ignore[method-assign]
    serde = default_serde()
    calls = [e for e in fleet(8, seed=3, prefix="ho") if isinstance(e, ev.ModelCall)][:6]
    from fleetplane.accounting.columnar import rows_of

    def batch(offsets: range) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {EVENTS: [], MODEL_CALLS: []}
        for offset in offsets:
            call = calls[offset - 10]
            value = serde.encode(call)
            event_row, fact, _ = rows_of(*serde.decode_record(value), "t", 0, offset, value)
            out[EVENTS].append(event_row)
            assert fact is not None
            out[fact[0]].append(fact[1])
        return out

    try:
        sink.add_batch(batch(range(10, 13)), {("t", 0): (10, 12)})
        assert sink.hand_off() == {("t", 0): 10}          # handed off, hanging
        sink.add_batch(batch(range(13, 16)), {("t", 0): (13, 15), ("t", 1): (4, 4)})
        assert sink.pending == 12   # 6 events rows and 6 model calls, buffered or in flight
        assert sink.hand_off() == {("t", 0): 10, ("t", 1): 4}   # in flight: not handed off
        gate.set()
        sink.flush()
        assert sink.hand_off() == {} and sink.pending == 0
        assert calls_of(store, sorted({c.team for c in calls})) == 6
    finally:
        gate.set()
        sink.close()


def test_a_second_process_joining_mid_run_leaves_every_row_stored_once(
    store: Store, base_settings: Settings, producer: EventProducer, unique: str,
) -> None:
    """A rebalance while hand-offs are in flight: the first process's revoked partitions are
    flushed (or their records redelivered), the second process takes them over, and the rows
    and rollups hold each event once."""
    events = fleet(500, seed=9, prefix=f"bgr{unique}")
    teams = sorted({e.team for e in events})
    calls = [e for e in events if isinstance(e, ev.ModelCall)]
    producer.send(events)
    producer.send(calls[:100])   # delivered twice
    group = f"bg-{unique}"
    settings = base_settings.model_copy(update={"clickhouse_database": store.database,
                                                "sink_flush_rows": 150})
    first, first_sink = build_processor(settings, store, group_id=group,
                                        instance_id=f"{group}-a")
    second, _ = build_processor(settings, store, group_id=group, instance_id=f"{group}-b")
    threads = [threading.Thread(target=p.run, daemon=True) for p in (first, second)]
    threads[0].start()
    try:
        wait_for(lambda: first_sink.stats.flushes > 0, what="the first process's hand-offs")
        threads[1].start()   # joins while the first one works through the backlog
        wait_for(lambda: second.partitions, what="the rebalance: partitions for the second")
        wait_for(lambda: calls_of(store, teams) >= len(calls), what="the model calls")
        time.sleep(1.5)   # checkpoints after the last call: nothing more must come
    finally:
        for processor, thread in zip((first, second), threads, strict=True):
            if thread.is_alive():
                stop(processor, thread)
    assert calls_of(store, teams) == len(calls)
    assert_rollups_equal_raw(store, teams)
