"""A batching ClickHouse sink for the loop (fleetplane.core.loop.Sink).

Handlers add rows; the loop calls ``flush()`` at every checkpoint, before it stores the input
offsets, so a stored offset always means its rows are in ClickHouse. The sink also flushes by
itself once it holds ``flush_rows`` rows. An insert that keeps failing raises Fatal: the loop
then stops without storing offsets and the records are redelivered (at-least-once).

Exact without FINAL: the rollups (infra/clickhouse/011_rollups.sql) are materialized views over
model_calls, attempt_outcomes and utilization; they see every inserted block, so a row inserted
twice would be summed twice. The sink therefore drops rows of those tables (DEDUPLICATED) whose
event_id was already stored, without asking ClickHouse on every flush:

* Copies within the batch, and copies of rows this process stored recently (a re-published
  event, a redelivery within this process): `RecentIds`, two generations of sets of event ids
  (set intersections run in C; memory bounded by `recent_ids`).
* Records redelivered after a restart or a rebalance (the only way an earlier process's rows
  come back at the same offsets): before its inserts, each flush records in `sink_progress`
  the highest offset per topic partition it is about to store (for the consumer group). After
  an assignment the sink reads those marks once; rows of records at or below its partition's
  mark may already be stored, and only they are looked up in ClickHouse (one query per flush
  that holds such rows, bounded to their occurred_at range and served by the bloom-filter
  index on event_id). Past the mark nothing is looked up: a steady flush asks ClickHouse
  nothing. Rows added without their `events` row (so without a source offset) are looked up.

Not caught: a copy of an event re-published at a new offset after this process restarted,
whose original was stored by the earlier process (the raw tables still collapse it; the
rollups would count it twice until `rollups.rebuild`). Producers re-publish with the same
event id within seconds (retries, the reconciler), well inside one process's RecentIds.

Before inserting the sink also fills what the events do not carry: model_calls.task_type and
attempt_outcomes.task_type (tasktypes.py), and attempt_outcomes.call_model / tier: the model and
tier of the attempt's last model call (by call_index), from the calls seen by this process or
else from ClickHouse. An attempt that made no model call keeps an empty call_model.
model_calls.first_call marks each task's first model call (tasktypes.FirstCalls): the rollups
count tasks by summing it.

Inserts are columnar (one list per column, built with zip in C) and sent as Native blocks.

Background inserts (`background=True`, the service's sink, settings.sink_background_inserts):
a hand-off prepares the buffered rows on the caller's thread (the columns above, deduplication,
the progress mark, and each table's Native block: the driver's serialization is Python, and on
the insert thread it contended with the loop for the GIL, issue 18's tenth round) and gives the
blocks to one insert thread, whose only work is the statements (chdb releases the GIL while it
runs one): the loop decodes the next batch while chdb inserts. At most one hand-off is in
flight; the next waits for it. The loop's checkpoint does not wait for it either
(`hand_off()`, core.loop.PipelinedSink): it hands off what is buffered and learns, per input
partition, the lowest offset whose rows are buffered or in flight, and stores offsets only up
to there (Confluent's parallel consumer: records finish out of order, offsets commit up to the
lowest unfinished one). So a stored offset still means every row before it is in ClickHouse.
`flush()` (a revocation, the last checkpoint, every other caller) waits until every row is
inserted. The event ids of rows in flight count as stored for deduplication; a failed insert
is the insert thread's Fatal, raised to the loop at its next hand-off or flush, which then stops
without storing the offsets of those rows (they are redelivered to the next process).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import TypeVar

from fleetplane.accounting.rows import (
    ATTEMPT_OUTCOMES,
    COLUMNS,
    EVENTS,
    EVENTS_COLUMNS,
    MODEL_CALL_FIRST,
    MODEL_CALL_TASK_TYPE,
    MODEL_CALLS,
    OUTCOME_TASK_TYPE,
    TASK_TRANSITIONS,
    TASK_TRANSITIONS_COLUMNS,
    UTILIZATION,
    Row,
)
from fleetplane.accounting.store import Store
from fleetplane.accounting.tasktypes import AttemptModels, FirstCalls, TaskTypes
from fleetplane.core.errors import Fatal, RetryPolicy
from fleetplane.core.logging import get_logger
from fleetplane.core.service import collector_paused

log = get_logger(__name__)
T = TypeVar("T")

_TT_TASK_TYPE = TASK_TRANSITIONS_COLUMNS.index("task_type")
_MC = {c: i for i, c in enumerate(COLUMNS[MODEL_CALLS])}
_AO = {c: i for i, c in enumerate(COLUMNS[ATTEMPT_OUTCOMES])}
_EV_TOPIC, _EV_PARTITION, _EV_OFFSET = (EVENTS_COLUMNS.index(c)
                                        for c in ("topic", "partition", "offset"))
# Tables whose rows feed rollups: deduplicated by event_id before insert.
DEDUPLICATED: tuple[str, ...] = (MODEL_CALLS, ATTEMPT_OUTCOMES, UTILIZATION)
PROGRESS = "sink_progress"
#: how far past a flush's highest offset its progress mark is set (see _mark_progress)
MARK_AHEAD = 50_000

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
    insert_seconds: float = 0.0     # serializing the blocks and running the statements
    statement_seconds: float = 0.0  # the statements alone (the insert thread's part)
    failures: int = 0
    lookups: int = 0            # flushes that asked ClickHouse for already stored event ids
    duplicates: int = 0         # rows of deduplicated tables not inserted again

    def rows_per_second(self) -> float:
        return self.rows / self.insert_seconds if self.insert_seconds > 0 else 0.0

    def statement_rows_per_second(self) -> float:
        return self.rows / self.statement_seconds if self.statement_seconds > 0 else 0.0


class RecentIds:
    """Event ids stored recently: two generations of sets (the newer one is retired when it
    holds capacity/2 ids), so membership is a C-level set intersection and memory is bounded."""

    def __init__(self, capacity: int = 2_000_000) -> None:
        self.half = max(1, capacity // 2)
        self._new: set[str] = set()
        self._old: set[str] = set()

    def known(self, ids: set[str]) -> set[str]:
        return (ids & self._new) | (ids & self._old)

    def add(self, ids: Iterable[str]) -> None:
        self._new.update(ids)
        if len(self._new) >= self.half:
            self._old, self._new = self._new, set()


class ClickHouseSink:
    """Buffers rows per table and inserts them in batches with explicit column names."""

    def __init__(self, store: Store, flush_rows: int = 5_000,
                 retry: RetryPolicy = DEFAULT_INSERT_RETRY,
                 columns: Mapping[str, Sequence[str]] = COLUMNS, *, group: str = "",
                 recent_ids: int = 2_000_000, background: bool = False) -> None:
        self.store = store
        self.flush_rows = max(1, flush_rows)
        self.retry = retry
        self.columns = dict(columns)
        self.group = group
        self.stats = SinkStats()
        self._buffers: dict[str, list[Row]] = {table: [] for table in self.columns}
        self._pending = 0
        self._lock = threading.RLock()
        self.task_types = TaskTypes(store)
        self.attempt_models = AttemptModels(store)
        self.first_calls = FirstCalls(store)
        self.recent = RecentIds(recent_ids)
        #: (topic, partition) -> highest offset an earlier process of the group may have
        #: stored (sink_progress); None until read after an assignment
        self._marks: dict[tuple[str, int], int] | None = None
        #: (topic, partition) -> highest offset among the buffered rows
        self._high: dict[tuple[str, int], int] = {}
        #: (topic, partition) -> the mark this process last wrote
        self._written: dict[tuple[str, int], int] = {}
        #: buffered rows (of DEDUPLICATED tables) that may already be stored: their event ids
        self._suspects: set[str] = set()
        #: (topic, partition) -> lowest source offset among the buffered rows; and whether a
        #: buffered row has no source offset (rows added without their `events` row)
        self._low: dict[tuple[str, int], int] = {}
        self._blind = False
        #: the insert thread (background inserts, see the module doc) and the hand-off in
        #: flight: its future, rows, and lowest source offsets (None: a row without one)
        self._inserter = (ThreadPoolExecutor(1, thread_name_prefix="sink-insert")
                          if background else None)
        self._inflight: Future[None] | None = None
        self._inflight_rows = 0
        self._inflight_low: dict[tuple[str, int], int] | None = {}

    @property
    def pending(self) -> int:
        """Rows buffered or in flight, not yet inserted."""
        inflight = self._inflight
        return self._pending + (self._inflight_rows if inflight and not inflight.done() else 0)

    def reassigned(self) -> None:
        """Partitions were (re)assigned: read the progress marks again before the next rows
        (another process of the group may have stored rows past our last offsets)."""
        with self._lock:
            self._marks = None

    def add(self, rows: Mapping[str, Sequence[Row]]) -> None:
        """Buffer rows by table; flush when the buffer reaches flush_rows."""
        with self._lock:
            source = rows.get(EVENTS)
            suspect = True
            if source:
                ev = source[0]
                key = (ev[_EV_TOPIC], ev[_EV_PARTITION])
                offset = ev[_EV_OFFSET]
                if self._high.get(key, -1) < offset:
                    self._high[key] = offset
                if self._low.get(key, offset) >= offset:
                    self._low[key] = offset
                marks = self._marks if self._marks is not None else self._load_marks()
                suspect = offset <= marks.get(key, -1)
            elif any(rows.values()):
                self._blind = True
            for table, batch in rows.items():
                self._buffer(table, batch, suspect)
            if self._pending >= self.flush_rows:
                self._hand_off()

    def add_batch(self, rows: Mapping[str, list[Row]],
                  offsets: Mapping[tuple[str, int], tuple[int, int]]) -> None:
        """Buffer the rows of a whole consumed batch (columnar.build): `offsets` gives, per
        topic partition, the lowest and highest offset of the records they come from. The
        rows of a batch that reaches back to or below a partition's progress mark are all
        looked up before insert (see the module doc); flush when the buffer is full."""
        with self._lock:
            marks = self._marks if self._marks is not None else self._load_marks()
            suspect = False
            for key, (low, high) in offsets.items():
                if self._high.get(key, -1) < high:
                    self._high[key] = high
                if self._low.get(key, low) >= low:
                    self._low[key] = low
                suspect = suspect or low <= marks.get(key, -1)
            for table, batch in rows.items():
                if batch:
                    self._buffer(table, batch, suspect)
            if self._pending >= self.flush_rows:
                self._hand_off()

    def _buffer(self, table: str, batch: Sequence[Row], suspect: bool) -> None:
        """One table's rows into its buffer (the lock held): remembered task types and attempt
        models, and their event ids looked up before insert when `suspect`."""
        buffer = self._buffers.get(table)
        if buffer is None:
            raise ValueError(f"unknown table {table!r}")
        buffer.extend(batch)
        self._pending += len(batch)
        if table == TASK_TRANSITIONS:
            remember = self.task_types.remember
            for row in batch:
                if row[_TT_TASK_TYPE]:
                    remember(row[0], row[_TT_TASK_TYPE])
        elif table == MODEL_CALLS:
            for row in batch:
                self.attempt_models.remember(row)
        if suspect and table in DEDUPLICATED:
            self._suspects.update(map(itemgetter(self.columns[table].index("event_id")), batch))

    def flush(self) -> None:
        """Insert every buffered row, table by table in the order of `columns` (rows.COLUMNS puts
        `events` last), and return once they are all in ClickHouse (with background inserts,
        the hand-off in flight too); Fatal when ClickHouse keeps failing."""
        with self._lock:
            self._hand_off()
            self._wait()

    def hand_off(self) -> dict[tuple[str, int], int]:
        """The loop's checkpoint (core.loop.PipelinedSink): start inserting the buffered rows
        unless a hand-off is still in flight, without waiting for it, and return per topic
        partition the lowest source offset whose rows are not yet inserted (buffered or in
        flight); offsets are stored up to there. Raises the Fatal of a failed hand-off. Without
        background inserts, or with buffered rows of no known source, this is flush()."""
        with self._lock:
            inflight = self._inflight
            if inflight is not None and inflight.done():
                self._wait()   # raises its Fatal
                inflight = None
            if self._inserter is None or self._blind or self._inflight_low is None:
                self.flush()
                return {}
            if inflight is None:
                self._hand_off()
            unfinished = dict(self._low)
            if self._inflight is not None:
                for key, low in self._inflight_low.items():
                    if unfinished.get(key, low) >= low:
                        unfinished[key] = low
            return unfinished

    def close(self) -> None:
        """Stop the insert thread (after flush(); rows still buffered are not inserted)."""
        if self._inserter is not None:
            self._inserter.shutdown(wait=True)

    def _hand_off(self) -> None:
        """Prepare the buffered rows and insert them: here, or on the insert thread once the
        hand-off in flight is done (the lock held)."""
        if not self._pending:
            return
        with collector_paused():   # its column lists and Native buffers
            self._fill_task_types()
            self._fill_attempt_models()
            self._drop_known()
            self._flag_first_calls()
            self._mark_progress()
            blocks: list[tuple[str, bytes, int]] = []
            stored: list[str] = []
            for table, buffer in self._buffers.items():
                if buffer:
                    blocks.append((table, self._serialized(table, buffer), len(buffer)))
                    if table in DEDUPLICATED:
                        stored.extend(map(itemgetter(self.columns[table].index("event_id")),
                                          buffer))
                    self._buffers[table] = []
        rows, self._pending = self._pending, 0
        low, self._low = (None if self._blind else self._low), {}
        self._blind = False
        self.recent.add(stored)
        self._suspects.clear()
        self._high.clear()
        self.stats.flushes += 1
        if self._inserter is None:
            self._insert_all(blocks)
            return
        self._wait()
        self._inflight_rows, self._inflight_low = rows, low
        self._inflight = self._inserter.submit(self._insert_all, blocks)

    def _wait(self) -> None:
        """Wait for the hand-off in flight; raises its Fatal."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            self._inflight_rows, self._inflight_low = 0, {}
            inflight.result()

    def _serialized(self, table: str, rows: list[Row]) -> bytes:
        """One table's rows as a Native block, on the caller's thread (the driver's
        serialization is Python: on the insert thread it contended for the GIL)."""
        started = time.perf_counter()
        block = self._retrying(f"serializing {table} ({len(rows)} rows)", lambda: (
            self.store.native_block(table, rows, self.columns[table])))
        self.stats.insert_seconds += time.perf_counter() - started   # counted as before
        return block

    def _insert_all(self, blocks: list[tuple[str, bytes, int]]) -> None:
        for table, block, rows in blocks:
            self._insert(table, block, rows)

    # -- restart safety --------------------------------------------------------------------
    def _load_marks(self) -> dict[tuple[str, int], int]:
        rows = self._retrying("reading the sink progress", lambda: self.store.query_rows(
            f"SELECT topic, `partition`, max(`offset`) FROM {self.store.table(PROGRESS)} "
            "WHERE consumer_group = {group:String} GROUP BY topic, `partition`",
            {"group": self.group}))
        self._marks = {(str(t), int(p)): int(o) for t, p, o in rows}
        return self._marks

    def _mark_progress(self) -> None:
        """Record, before the inserts, how far this flush goes per topic partition. A mark is
        set MARK_AHEAD offsets past the flush, so most flushes need no mark at all (one insert
        fewer); after a restart at most MARK_AHEAD records per partition are looked up in vain."""
        rows = [(self.group, t, p, o + MARK_AHEAD) for (t, p), o in self._high.items()
                if o > self._written.get((t, p), -1)]
        if not rows:
            return
        self._retrying("recording the sink progress", lambda: self.store.insert(
            PROGRESS, rows, ("consumer_group", "topic", "partition", "offset")))
        for _, t, p, o in rows:
            self._written[(t, p)] = o

    # -- deduplication ---------------------------------------------------------------------
    def _drop_known(self) -> None:
        """Drop rows of the deduplicated tables whose event_id is already in the batch, among
        the ids this process stored, or (for suspect rows only) in ClickHouse."""
        for table in DEDUPLICATED:
            rows = self._buffers.get(table)
            if not rows:
                continue
            cols = self.columns[table]
            eid, at = cols.index("event_id"), cols.index("occurred_at")
            ids: list[str] = list(map(itemgetter(eid), rows))
            unique = set(ids)
            known = self.recent.known(unique)
            suspects = unique & self._suspects
            if suspects - known:
                check = suspects - known
                times = [row[at] for row in rows if row[eid] in check]
                known |= self._known_event_ids(table, check, min(times), max(times))
            if not known and len(unique) == len(ids):
                continue
            kept: list[Row] = []
            seen: set[str] = set()
            for key, row in zip(ids, rows, strict=True):
                if key in known or key in seen:
                    continue
                seen.add(key)
                kept.append(row)
            dropped = len(rows) - len(kept)
            log.info("rows already recorded were not inserted again", table=table, rows=dropped)
            self.stats.duplicates += dropped
            self._pending -= dropped
            rows[:] = kept

    def _known_event_ids(self, table: str, event_ids: set[str], first: datetime, last: datetime
                         ) -> set[str]:
        self.stats.lookups += 1
        rows = self._retrying(f"looking up recorded {table}", lambda: self.store.query_rows(
            f"SELECT event_id FROM {self.store.table(table)} "
            "WHERE occurred_at >= toDateTime64({first:String}, 3, 'UTC') "
            "AND occurred_at < toDateTime64({last:String}, 3, 'UTC') "
            "AND event_id IN {ids:Array(String)}",
            {"first": _utc_second(first), "last": _utc_second(last, 1),
             "ids": sorted(event_ids)}))
        return {str(r[0]) for r in rows}

    # -- columns the events do not carry ---------------------------------------------------
    def _flag_first_calls(self) -> None:
        """Set model_calls.first_call on each task's first model call (after deduplication:
        a redelivered first call was stored with its flag and is not inserted again)."""
        rows = self._buffers.get(MODEL_CALLS)
        if not rows:
            return
        col = MODEL_CALL_FIRST
        for i in self._retrying("looking up tasks' earlier model calls",
                                lambda: self.first_calls.first_rows(rows)):
            row = rows[i]
            rows[i] = (*row[:col], 1, *row[col + 1:])

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

    # -- ClickHouse calls ------------------------------------------------------------------
    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        attempt = 1
        while True:
            try:
                return call()
            except Exception as exc:
                self.stats.failures += 1
                if attempt >= self.retry.maximum_attempts:
                    raise Fatal(f"{what} failed {attempt} times: {exc}") from exc
                delay = self.retry.delay(attempt)
                log.warning("clickhouse call failed, retrying", what=what, attempt=attempt,
                            delay_s=delay, error=str(exc)[:500])
                time.sleep(delay)
                attempt += 1

    def _insert(self, table: str, block: bytes, rows: int) -> None:
        started = time.perf_counter()
        self._retrying(f"insert into {table} ({rows} rows)",
                       lambda: self.store.insert_block(table, self.columns[table], block))
        took = time.perf_counter() - started
        self.stats.insert_seconds += took
        self.stats.statement_seconds += took
        self.stats.rows += rows
        self.stats.inserts += 1
