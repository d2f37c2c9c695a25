"""A batching ClickHouse sink for the loop (fleetplane.core.loop.Sink).

Handlers add rows; the loop calls ``flush()`` at every checkpoint, before it stores the input
offsets, so a stored offset always means its rows are in ClickHouse. The sink also flushes by
itself once it holds ``flush_rows`` rows. An insert that keeps failing raises Fatal: the loop
then stops without storing offsets and the records are redelivered (at-least-once; rows are
deduplicated by event_id in ClickHouse).

ReplacingMergeTree tables deduplicate on their own (queries read them with FINAL), but the daily
cost rollups are materialized views over model_calls: they see every inserted block, so a model
call inserted twice (a batch redelivered after a crash between insert and offset commit, or an
audit event the executor re-published) would be summed twice. The sink therefore drops
model_calls rows whose event_id is already in the batch or already in ClickHouse before it
inserts (one lookup per flush, on the table's sort key).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleetplane.accounting.rows import (
    COLUMNS,
    MODEL_CALL_TASK_TYPE,
    MODEL_CALLS,
    TASK_TRANSITIONS,
    TASK_TRANSITIONS_COLUMNS,
    Row,
)
from fleetplane.accounting.store import Store
from fleetplane.accounting.tasktypes import TaskTypes
from fleetplane.core.errors import Fatal, RetryPolicy
from fleetplane.core.logging import get_logger

log = get_logger(__name__)

_TT_TASK_TYPE = TASK_TRANSITIONS_COLUMNS.index("task_type")
_MC_EVENT_ID = COLUMNS[MODEL_CALLS].index("event_id")

DEFAULT_INSERT_RETRY = RetryPolicy(initial_interval_s=0.2, backoff_coefficient=2.0,
                                   maximum_interval_s=5.0, maximum_attempts=6)


@dataclass
class SinkStats:
    rows: int = 0
    inserts: int = 0
    flushes: int = 0
    insert_seconds: float = 0.0
    failures: int = 0

    def rows_per_second(self) -> float:
        return self.rows / self.insert_seconds if self.insert_seconds > 0 else 0.0


class ClickHouseSink:
    """Buffers rows per table and inserts them in batches with explicit column names."""

    def __init__(self, store: Store, flush_rows: int = 5_000,
                 retry: RetryPolicy = DEFAULT_INSERT_RETRY,
                 columns: Mapping[str, Sequence[str]] = COLUMNS) -> None:
        self.store = store
        self.flush_rows = max(1, flush_rows)
        self.retry = retry
        self.columns = dict(columns)
        self.stats = SinkStats()
        self._buffers: dict[str, list[Row]] = {table: [] for table in self.columns}
        self._pending = 0
        self._lock = threading.RLock()
        self.task_types = TaskTypes(store)

    @property
    def pending(self) -> int:
        """Rows buffered and not yet inserted."""
        return self._pending

    def add(self, rows: Mapping[str, Sequence[Row]]) -> None:
        """Buffer rows by table; flush when the buffer reaches flush_rows."""
        with self._lock:
            for table, batch in rows.items():
                if table not in self._buffers:
                    raise ValueError(f"unknown table {table!r}")
                self._buffers[table].extend(batch)
                self._pending += len(batch)
                if table == TASK_TRANSITIONS:
                    for row in batch:
                        self.task_types.remember(row[0], row[_TT_TASK_TYPE])
            if self._pending >= self.flush_rows:
                self.flush()

    def flush(self) -> None:
        """Insert every buffered row, table by table in the order of `columns` (rows.COLUMNS puts
        `events` last); Fatal when ClickHouse keeps failing."""
        with self._lock:
            if not self._pending:
                return
            self._fill_task_types()
            self._drop_known_model_calls()
            for table, buffer in self._buffers.items():
                if buffer:
                    self._insert(table, buffer)
                    self._pending -= len(buffer)
                    buffer.clear()
            self.stats.flushes += 1

    def _fill_task_types(self) -> None:
        """Set model_calls.task_type from the tasks' lifecycle rows (see tasktypes.py)."""
        calls = self._buffers.get(MODEL_CALLS)
        if not calls:
            return
        unknown = {row[0] for row in calls if not row[MODEL_CALL_TASK_TYPE]}
        if not unknown:
            return
        try:
            types = self.task_types.resolve(unknown)
        except Exception as exc:  # the lookup is best effort; the insert must not wait on it
            log.warning("task type lookup failed", error=str(exc)[:300])
            return
        for i, row in enumerate(calls):
            task_type = types.get(row[0], "")
            if task_type and not row[MODEL_CALL_TASK_TYPE]:
                calls[i] = (*row[:MODEL_CALL_TASK_TYPE], task_type,
                            *row[MODEL_CALL_TASK_TYPE + 1:])

    def _drop_known_model_calls(self) -> None:
        calls = self._buffers.get(MODEL_CALLS)
        if not calls:
            return
        fresh: dict[str, Row] = {}
        for row in calls:
            fresh.setdefault(str(row[_MC_EVENT_ID]), row)
        known = self._known_event_ids({str(r[0]) for r in fresh.values()}, set(fresh))
        kept = [row for eid, row in fresh.items() if eid not in known]
        dropped = len(calls) - len(kept)
        if dropped:
            log.info("model calls already recorded were not inserted again", rows=dropped)
            self._pending -= dropped
            calls[:] = kept

    def _known_event_ids(self, task_ids: set[str], event_ids: set[str]) -> set[str]:
        attempt = 1
        while True:
            try:
                rows = self.store.query_rows(
                    f"SELECT event_id FROM {self.store.table(MODEL_CALLS)} "
                    "WHERE task_id IN {tasks:Array(String)} AND event_id IN {ids:Array(String)}",
                    {"tasks": sorted(task_ids), "ids": sorted(event_ids)})
                return {str(r[0]) for r in rows}
            except Exception as exc:
                self.stats.failures += 1
                if attempt >= self.retry.maximum_attempts:
                    raise Fatal(f"looking up recorded model calls failed {attempt} times: "
                                f"{exc}") from exc
                time.sleep(self.retry.delay(attempt))
                attempt += 1

    def _insert(self, table: str, rows: list[Row]) -> None:
        attempt = 1
        while True:
            started = time.perf_counter()
            try:
                self.store.insert(table, rows, self.columns[table])
            except Exception as exc:
                self.stats.failures += 1
                if attempt >= self.retry.maximum_attempts:
                    raise Fatal(f"insert into {table} failed {attempt} times: {exc}") from exc
                delay = self.retry.delay(attempt)
                log.warning("clickhouse insert failed, retrying", table=table, rows=len(rows),
                            attempt=attempt, delay_s=delay, error=str(exc)[:500])
                time.sleep(delay)
                attempt += 1
                continue
            self.stats.insert_seconds += time.perf_counter() - started
            self.stats.rows += len(rows)
            self.stats.inserts += 1
            return
