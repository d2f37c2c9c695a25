"""Each task's trace id, recorded by accounting from the `traceparent` headers of the records
it stores (table `task_traces`), and served at GET /v1/tasks/{id}/trace for `fleetplane
describe`. A task has one trace id, or more when its submission joined a caller's trace and a
later hop started another (e.g. an executor restarted without the context; rare).

No OpenTelemetry import here: the CLI uses `trace_ids` without the SDK."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol

import httpx
from fastapi import FastAPI

from fleetplane.core.events import Event
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import Handler, Output, Record, Sink
from fleetplane.tracing.propagation import TRACEPARENT, trace_id_of

log = get_logger(__name__)

TABLE = "task_traces"
COLUMNS = ("task_id", "team", "trace_id", "occurred_at")
DDL = """CREATE TABLE IF NOT EXISTS {table}
(
    task_id     String,
    team        LowCardinality(String),
    trace_id    String,
    occurred_at DateTime64(3, 'UTC'),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (task_id, trace_id)
{ttl}"""


class Store(Protocol):  # accounting.store.Store, as much of it as is used here
    def table(self, name: str) -> str: ...

    def command(self, sql: str, parameters: Any = None) -> Any: ...

    def query(self, sql: str, parameters: Any = None) -> list[dict[str, Any]]: ...

    def insert(self, table: str, rows: Any, column_names: Any) -> None: ...


class TraceIds:
    """Wraps accounting's handler (`wrap`) to note a (task, trace) pair the first time it is
    seen, and its sink (`beside`) to insert them at each checkpoint, before the offsets are
    stored (at-least-once, deduplicated by the table's key)."""

    def __init__(self, store: Store, ttl_days: int = 90, memory: int = 100_000) -> None:
        self.store = store
        ttl = (f"TTL toDateTime(occurred_at) + INTERVAL {int(ttl_days)} DAY"
               if ttl_days > 0 else "")
        store.command(DDL.format(table=store.table(TABLE), ttl=ttl))
        self.memory = memory
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._rows: list[tuple[str, str, str, datetime]] = []

    def note(self, event: Event, rec: Record) -> None:
        trace_id = trace_id_of(rec.headers.get(TRACEPARENT))
        if trace_id is None or not event.task_id:
            return
        key = (event.task_id, trace_id)
        if key in self._seen:
            return
        self._seen[key] = None
        while len(self._seen) > self.memory:
            self._seen.popitem(last=False)
        self._rows.append((event.task_id, event.team, trace_id, event.occurred_at))

    def wrap(self, handler: Handler) -> Handler:
        def handle(event: Event, rec: Record) -> Iterable[Output]:
            outputs = handler(event, rec)
            self.note(event, rec)
            return outputs

        return handle

    def flush(self) -> None:
        if self._rows:
            rows, self._rows = self._rows, []
            self.store.insert(TABLE, rows, COLUMNS)

    def beside(self, sink: Sink | None) -> Sink:
        traces = self

        class Both:
            def flush(self) -> None:
                traces.flush()
                if sink is not None:
                    sink.flush()

        return Both()

    def of(self, task_id: str) -> list[str]:
        rows = self.store.query(
            f"SELECT trace_id, min(occurred_at) AS first FROM {self.store.table(TABLE)} "
            "WHERE task_id = {task_id:String} GROUP BY trace_id ORDER BY first",
            {"task_id": task_id})
        return [str(r["trace_id"]) for r in rows]


def mount_traces(app: FastAPI, traces: TraceIds) -> None:
    """GET /v1/tasks/{task_id}/trace: {"task_id", "trace_ids"} (first first)."""

    @app.get("/v1/tasks/{task_id}/trace")
    def task_trace(task_id: str) -> dict[str, Any]:
        return {"task_id": task_id, "trace_ids": traces.of(task_id)}


def trace_ids(accounting_url: str, task_id: str, timeout_s: float = 5.0) -> list[str]:
    """The trace ids accounting recorded for a task ([] when none or unreachable)."""
    try:
        resp = httpx.get(f"{accounting_url.rstrip('/')}/v1/tasks/{task_id}/trace",
                         timeout=timeout_s)
        if resp.status_code != 200:
            return []
        return [str(t) for t in resp.json().get("trace_ids", [])]
    except (httpx.HTTPError, ValueError):
        return []
