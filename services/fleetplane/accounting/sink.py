"""A batching ClickHouse sink for the loop (fleetplane.core.loop.Sink).

Handlers add rows; the loop calls ``flush()`` at every checkpoint, before it stores the input
offsets, so a stored offset always means its rows are in ClickHouse. The sink also flushes by
itself once it holds ``flush_rows`` rows. An insert that keeps failing raises Fatal: the loop
then stops without storing offsets and the records are redelivered (at-least-once; rows are
deduplicated by event_id in ClickHouse).

Exact without FINAL: the rollups (infra/clickhouse/011_rollups.sql) are materialized views over
model_calls and attempt_outcomes; they see every inserted block, so a row inserted twice (a batch
redelivered after a crash between insert and offset commit, or an event re-published) would be
summed twice. The sink therefore drops rows of those tables whose event_id is already in the
batch or already in ClickHouse before it inserts (one lookup per table and flush, bounded to the
batch's occurred_at range and served by a bloom-filter index on event_id). Every row then reaches
the rollups once, and reads of those tables need no FINAL.

Before inserting it also fills what the events do not carry: model_calls.task_type and
attempt_outcomes.task_type (tasktypes.py), and attempt_outcomes.call_model / tier: the model and
tier of the attempt's last model call (by call_index), from the calls seen by this process or
else from ClickHouse. An attempt that made no model call keeps an empty call_model.

Inserts are columnar (one list per column, built with zip in C), so a flush does no per-row
Python work beyond the lookups above.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fleetplane.accounting.rows import (
    ATTEMPT_OUTCOMES,
    COLUMNS,
    MODEL_CALL_TASK_TYPE,
    MODEL_CALLS,
    OUTCOME_TASK_TYPE,
    TASK_TRANSITIONS,
    TASK_TRANSITIONS_COLUMNS,
    UTILIZATION,
    Row,
)
from fleetplane.accounting.store import Store
from fleetplane.accounting.tasktypes import AttemptModels, TaskTypes
from fleetplane.core.errors import Fatal, RetryPolicy
from fleetplane.core.logging import get_logger

log = get_logger(__name__)

_TT_TASK_TYPE = TASK_TRANSITIONS_COLUMNS.index("task_type")
_MC = {c: i for i, c in enumerate(COLUMNS[MODEL_CALLS])}
_AO = {c: i for i, c in enumerate(COLUMNS[ATTEMPT_OUTCOMES])}
# Tables whose rows feed rollups: deduplicated by event_id before insert.
DEDUPLICATED: tuple[str, ...] = (MODEL_CALLS, ATTEMPT_OUTCOMES, UTILIZATION)

DEFAULT_INSERT_RETRY = RetryPolicy(initial_interval_s=0.2, backoff_coefficient=2.0,
                                   maximum_interval_s=5.0, maximum_attempts=6)


def _utc_second(value: datetime, add: int = 0) -> str:
    """A row time as 'YYYY-MM-DD hh:mm:ss' in UTC, truncated to the second (plus `add` s)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value.astimezone(UTC) + timedelta(seconds=add)).strftime("%Y-%m-%d %H:%M:%S")


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
        self.attempt_models = AttemptModels(store)

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
                elif table == MODEL_CALLS:
                    for row in batch:
                        self.attempt_models.remember(row)
            if self._pending >= self.flush_rows:
                self.flush()

    def flush(self) -> None:
        """Insert every buffered row, table by table in the order of `columns` (rows.COLUMNS puts
        `events` last); Fatal when ClickHouse keeps failing."""
        with self._lock:
            if not self._pending:
                return
            self._fill_task_types()
            self._fill_attempt_models()
            for table in DEDUPLICATED:
                self._drop_known(table)
            for table, buffer in self._buffers.items():
                if buffer:
                    self._insert(table, buffer)
                    self._pending -= len(buffer)
                    buffer.clear()
            self.stats.flushes += 1

    def _fill_task_types(self) -> None:
        """Set model_calls.task_type and attempt_outcomes.task_type from the tasks' lifecycle rows
        (see tasktypes.py)."""
        targets = [(MODEL_CALLS, MODEL_CALL_TASK_TYPE), (ATTEMPT_OUTCOMES, OUTCOME_TASK_TYPE)]
        unknown = {row[0] for table, col in targets for row in self._buffers.get(table, ())
                   if not row[col]}
        if not unknown:
            return
        try:
            types = self.task_types.resolve(unknown)
        except Exception as exc:  # the lookup is best effort; the insert must not wait on it
            log.warning("task type lookup failed", error=str(exc)[:300])
            return
        for table, col in targets:
            rows = self._buffers.get(table)
            if not rows:
                continue
            for i, row in enumerate(rows):
                task_type = types.get(row[0], "")
                if task_type and not row[col]:
                    rows[i] = (*row[:col], task_type, *row[col + 1:])

    def _fill_attempt_models(self) -> None:
        outcomes = self._buffers.get(ATTEMPT_OUTCOMES)
        if not outcomes:
            return
        model_col, tier_col = _AO["call_model"], _AO["tier"]
        for i, row in enumerate(outcomes):
            if row[_AO["cached"]] and not row[model_col]:
                # a cached completion made no call: it stands for the model it reused
                fixed = list(row)
                fixed[model_col] = row[_AO["model"]]
                outcomes[i] = tuple(fixed)
        wanted = {(str(r[0]), int(r[_AO["attempt"]])) for r in outcomes if not r[model_col]}
        if not wanted:
            return
        try:
            found = self.attempt_models.resolve(wanted, {str(r[1]) for r in outcomes})
        except Exception as exc:  # best effort, like the task types
            log.warning("attempt model lookup failed", error=str(exc)[:300])
            return
        for i, row in enumerate(outcomes):
            hit = found.get((str(row[0]), int(row[_AO["attempt"]])))
            if hit and not row[model_col]:
                fixed = list(row)
                fixed[model_col], fixed[tier_col] = hit
                outcomes[i] = tuple(fixed)

    def _drop_known(self, table: str) -> None:
        """Drop rows whose event_id is already in the batch or in ClickHouse."""
        rows = self._buffers.get(table)
        if not rows:
            return
        cols = {c: i for i, c in enumerate(self.columns[table])}
        eid, at = cols["event_id"], cols["occurred_at"]
        fresh: dict[str, Row] = {}
        for row in rows:
            fresh.setdefault(str(row[eid]), row)
        times = [row[at] for row in fresh.values()]
        known = self._known_event_ids(table, set(fresh), min(times), max(times))
        kept = [row for key, row in fresh.items() if key not in known]
        dropped = len(rows) - len(kept)
        if dropped:
            log.info("rows already recorded were not inserted again", table=table, rows=dropped)
            self._pending -= dropped
            rows[:] = kept

    def _known_event_ids(self, table: str, event_ids: set[str], first: datetime, last: datetime
                         ) -> set[str]:
        attempt = 1
        while True:
            try:
                rows = self.store.query_rows(
                    f"SELECT event_id FROM {self.store.table(table)} "
                    "WHERE occurred_at >= toDateTime64({first:String}, 3, 'UTC') "
                    "AND occurred_at < toDateTime64({last:String}, 3, 'UTC') "
                    "AND event_id IN {ids:Array(String)}",
                    {"first": _utc_second(first), "last": _utc_second(last, 1),
                     "ids": sorted(event_ids)})
                return {str(r[0]) for r in rows}
            except Exception as exc:
                self.stats.failures += 1
                if attempt >= self.retry.maximum_attempts:
                    raise Fatal(f"looking up recorded {table} failed {attempt} times: "
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
