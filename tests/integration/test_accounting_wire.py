"""The sink's wire types (accounting/wire.py): LowCardinality columns sent as String and
DateTime64 columns as ticks store exactly what the driver's own conversion stores."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from fleetplane.accounting.rows import COLUMNS, EVENTS
from fleetplane.accounting.store import Store
from fleetplane.accounting.wire import tick_of, ticks, wire_type
from tests.integration.test_accounting import close_test_store, open_test_store

MS = timedelta(milliseconds=1)


def test_wire_type_strips_only_a_top_level_low_cardinality() -> None:
    assert wire_type("LowCardinality(String)") == "String"
    assert wire_type("LowCardinality(Nullable(String))") == "Nullable(String)"
    assert wire_type("Array(LowCardinality(String))") == "Array(LowCardinality(String))"
    assert wire_type("DateTime64(3, 'UTC')") == "DateTime64(3, 'UTC')"


def test_ticks_floor_to_the_column_precision_in_any_time_zone() -> None:
    assert tick_of("DateTime64(3, 'UTC')") == MS
    assert tick_of("DateTime64(6)") == timedelta(microseconds=1)
    assert tick_of("DateTime('UTC')") is None and tick_of("String") is None
    plus2 = timezone(timedelta(hours=2))
    values = [datetime(2026, 12, 5, 10, 0, 0, 999_999, tzinfo=UTC),
              datetime(2026, 12, 5, 12, 0, 0, 1_000, tzinfo=plus2),
              datetime(1969, 12, 31, 23, 59, 59, 999_500, tzinfo=UTC)]
    stamp = int(datetime(2026, 12, 5, 10, tzinfo=UTC).timestamp()) * 1000
    assert ticks(values, MS) == [stamp + 999, stamp + 1, -1]


def test_ticks_leave_a_column_the_driver_must_convert() -> None:
    naive = [datetime(2026, 12, 5, 10)]
    with_none = [datetime(2026, 12, 5, 10, tzinfo=UTC), None]
    assert ticks(naive, MS) is naive
    assert ticks(with_none, MS) is with_none
    assert ticks([], MS) == []


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = open_test_store(tmp_path_factory.mktemp("wire") / "clickhouse")
    yield s
    close_test_store(s)


def test_rows_read_back_as_inserted(store: Store) -> None:
    at = datetime(2026, 12, 5, 10, 11, 12, 345_678, tzinfo=UTC)
    rows = [(f"e-{i}", "ModelCall", "t-wire", f"team-{i % 2}", at + i * MS, 3, "", "model.calls",
             i, 100 + i, '{"x": 1}', b"\xc3\x01avro") for i in range(5)]
    store.insert(EVENTS, rows, COLUMNS[EVENTS])
    back = store.query_rows(
        f"SELECT event_id, event_type, team, occurred_at, topic, `offset`, toTypeName(team) "
        f"FROM {store.table(EVENTS)} WHERE task_id = 't-wire' ORDER BY event_id")
    assert [tuple(r[:6]) for r in back] == [
        (f"e-{i}", "ModelCall", f"team-{i % 2}",
         datetime(2026, 12, 5, 10, 11, 12, 345_000, tzinfo=UTC) + i * MS, "model.calls", 100 + i)
        for i in range(5)]
    assert {r[6] for r in back} == {"LowCardinality(String)"}


def test_a_row_of_the_wrong_width_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="columns"):
        store.insert(EVENTS, [("e-x", "ModelCall")], COLUMNS[EVENTS])
