"""The ClickHouse connection: chdb (in-process, ``chdb:///abs/dir``) or a server (``http(s)://``).

One ``Store`` per process. The processor loop (inserts) and the HTTP threads (queries) share it,
so every call holds a lock: a chdb connection handle serves one call at a time, and a server
session may not run two queries at once either. Reads that should not wait for each other (one
dashboard refresh) run on `parallel()`: a small pool of further clients, each with its own
handle and lock (chdb serves any number of handles on its one engine; a server, connections).

`metered()` counts the queries run and the rows and bytes ClickHouse read for them (from each
query's summary), on this store and its pool: what a dashboard refresh costs.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.insert import InsertContext
from clickhouse_connect.driver.transform import NativeTransform

from fleetplane.accounting.wire import tick_of, ticks, wire_type
from fleetplane.core.logging import get_logger
from fleetplane.core.settings import Settings

log = get_logger(__name__)
T = TypeVar("T")
_METER_LOCK = threading.Lock()   # meters are shared by a store and its pool's threads

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_chdb(dsn: str) -> bool:
    return dsn.startswith("chdb:")


def check_identifier(name: str) -> str:
    """A database name is interpolated into SQL: allow plain identifiers only."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a valid ClickHouse identifier: {name!r}")
    return name


@dataclass
class QueryMeter:
    """Queries run and what ClickHouse read for them (see Store.metered). On a server
    read_rows/read_bytes are the query summary's; on chdb (clickhouse-connect 1.12) the summary's
    read_rows counts the result rows instead, so `statements` keeps each query and its
    parameters for an EXPLAIN ESTIMATE."""

    queries: int = 0
    read_rows: int = 0
    read_bytes: int = 0
    statements: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


class Store:
    """A locked ClickHouse client bound to the fleetplane database."""

    def __init__(self, client: Client, database: str, dsn: str = "",
                 lock: threading.RLock | None = None,
                 open_client: Callable[[], Client] | None = None) -> None:
        self.client = client
        self.database = check_identifier(database)
        self.dsn = dsn
        self.lock = lock or threading.RLock()
        self._insert_contexts: dict[tuple[str, tuple[str, ...]],
                                    tuple[InsertContext, list[timedelta | None]]] = {}
        self._contexts_lock = threading.Lock()
        #: opens another client on the same target (the read pool); None: no pool
        self.open_client = open_client
        self._readers: list[Store] = []
        self._readers_lock = threading.Lock()
        self._meters: list[QueryMeter] = []

    def with_database(self, database: str) -> Store:
        """A Store on the same client and lock, bound to another database."""
        other = Store(self.client, database, self.dsn, self.lock, self.open_client)
        other._meters = self._meters
        return other

    # -- reads in parallel -----------------------------------------------------------------
    def _reader_stores(self, n: int) -> list[Store]:
        with self._readers_lock:
            while len(self._readers) < n and self.open_client is not None:
                reader = Store(self.open_client(), self.database, self.dsn)
                reader._meters = self._meters
                self._readers.append(reader)
            return self._readers[:n]

    def parallel(self, calls: Mapping[str, Callable[[Store], T]], readers: int = 4
                 ) -> dict[str, T]:
        """Run independent reads at once, each on a pooled client: {name: call(store)}. Without
        a pool (a Store built on a bare client) they run one after another on this store."""
        stores = self._reader_stores(max(1, min(readers, len(calls))))
        if not stores:
            return {name: call(self) for name, call in calls.items()}
        free: list[Store] = list(stores)
        free_lock = threading.Lock()

        def run(call: Callable[[Store], T]) -> T:
            with free_lock:
                store = free.pop()
            try:
                return call(store)
            finally:
                with free_lock:
                    free.append(store)

        with ThreadPoolExecutor(len(stores), thread_name_prefix="ch-read") as pool:
            futures = {name: pool.submit(run, call) for name, call in calls.items()}
            return {name: f.result() for name, f in futures.items()}

    # -- metering --------------------------------------------------------------------------
    @contextmanager
    def metered(self) -> Iterator[QueryMeter]:
        """Count the queries (query, query_rows, query_table) run inside the block on this store
        and its pool, with the rows and bytes ClickHouse read for them."""
        meter = QueryMeter()
        with _METER_LOCK:
            self._meters.append(meter)
        try:
            yield meter
        finally:
            with _METER_LOCK:
                self._meters.remove(meter)

    def _meter(self, summary: Mapping[str, Any] | None, sql: str,
               parameters: Mapping[str, Any] | None) -> None:
        if not self._meters:
            return
        summary = summary or {}
        with _METER_LOCK:
            for meter in self._meters:
                meter.queries += 1
                meter.read_rows += int(summary.get("read_rows", 0) or 0)
                meter.read_bytes += int(summary.get("read_bytes", 0) or 0)
                meter.statements.append((sql, dict(parameters or {})))

    def table(self, name: str) -> str:
        """The qualified name of a fleetplane table: ``database.name``."""
        return f"{self.database}.{check_identifier(name)}"

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        with self.lock:
            return self.client.command(sql, parameters=dict(parameters or {}))

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows as dicts (column name -> value)."""
        with self.lock:
            result = self.client.query(sql, parameters=dict(parameters or {}))
            rows = list(result.named_results())
        self._meter(result.summary, sql, parameters)
        return rows

    def query_rows(self, sql: str, parameters: Mapping[str, Any] | None = None
                   ) -> list[Sequence[Any]]:
        """Rows as sequences."""
        with self.lock:
            result = self.client.query(sql, parameters=dict(parameters or {}))
            rows = list(result.result_rows)
        self._meter(result.summary, sql, parameters)
        return rows

    def query_table(self, sql: str, settings: Mapping[str, Any] | None = None,
                    ) -> tuple[list[str], list[list[Any]]]:
        """(column names, rows) of a query run with per-query settings, with the fleetplane
        database as the default one (analysts write `FROM model_calls`)."""
        with self.lock:
            previous = self.client.database
            self.client.database = self.database
            try:
                result = self.client.query(sql, settings=dict(settings or {}))
            finally:
                self.client.database = previous
            out = list(result.column_names), [list(r) for r in result.result_rows]
        self._meter(result.summary, sql, settings)
        return out

    def insert(self, table: str, rows: Sequence[Sequence[Any]],
               column_names: Sequence[str]) -> None:
        if not rows:
            return
        self.insert_block(table, column_names, self.native_block(table, rows, column_names))

    def native_block(self, table: str, rows: Sequence[Sequence[Any]],
                     column_names: Sequence[str]) -> bytes:
        """The rows as one Native block (the driver's serialization, in Python): what
        `insert_block` sends. Built apart from the insert so the sink's loop thread serializes
        while its insert thread waits for ClickHouse (sink.py, background inserts)."""
        key = (table, tuple(column_names))
        # A cached insert context spares a DESCRIBE TABLE round trip per insert; its column
        # types are the wire types (wire.py), with the DateTime64 ticks. Only serialization
        # uses the contexts (not the client): no store lock unless one is described.
        with self._contexts_lock:
            cached = self._insert_contexts.get(key)
            if cached is None:
                with self.lock:
                    cached = self._insert_context(table, column_names)
                self._insert_contexts[key] = cached
            context, tick = cached
            if len(rows[0]) != len(tick):
                raise ValueError(f"{table}: rows of {len(rows[0])} values for {len(tick)} columns")
            try:
                # Columnar: one list per column (itemgetter over the rows, in C); the driver
                # then serializes each column without visiting rows.
                context.data = [ticks(c, t) if t is not None else c for c, t in
                                zip(map(_column, range(len(tick)), repeat(rows)), tick,
                                    strict=True)]
                context.compression = False
                block = b"".join(NativeTransform.build_insert(context))
                failed, context.insert_exception = context.insert_exception, None
                if failed is not None:
                    raise failed
            except Exception:
                self._insert_contexts.pop(key, None)
                raise
            finally:
                context.data = None
        # the first chunk starts with the statement the driver would send over HTTP
        return block[block.index(b"\n") + 1:] if block.startswith(b"INSERT INTO ") else block

    def insert_block(self, table: str, column_names: Sequence[str], block: bytes) -> None:
        """Insert a Native block (`native_block`); ClickHouse converts the wire types to the
        table's (input_format_native_allow_types_conversion)."""
        with self.lock:
            self.client.raw_insert(self.table(table), list(column_names), block, fmt="Native")

    def _insert_context(self, table: str, column_names: Sequence[str]
                        ) -> tuple[InsertContext, list[timedelta | None]]:
        described = self.client.create_insert_context(self.table(table),
                                                      column_names=list(column_names))
        names = [t.name for t in described.column_types]
        context = self.client.create_insert_context(
            self.table(table), column_names=list(column_names),
            column_type_names=[wire_type(n) for n in names], column_oriented=True)
        return context, [tick_of(n) for n in names]

    def ping(self) -> bool:
        try:
            with self.lock:
                return bool(self.client.command("SELECT 1") == 1)
        except Exception:
            log.warning("clickhouse ping failed", exc_info=True)
            return False

    def close(self) -> None:
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()
        with self.lock:
            self.client.close()


def _column(index: int, rows: Sequence[Sequence[Any]]) -> list[Any]:
    return list(map(itemgetter(index), rows))


def connect(settings: Settings) -> Store:
    """Open the ClickHouse DSN of `settings` (the chdb directory is created when missing)."""
    dsn = settings.resolved_clickhouse_dsn()
    kwargs: dict[str, Any] = {"tz_mode": "aware"}
    if is_chdb(dsn):
        path = dsn.removeprefix("chdb://")
        if path.startswith("/"):
            Path(path).mkdir(parents=True, exist_ok=True)
    else:
        # Queries are serialized by the Store lock; no server session is needed.
        kwargs["autogenerate_session_id"] = False
    client = clickhouse_connect.get_client(dsn=dsn, **kwargs)
    log.info("clickhouse connected", backend="chdb" if is_chdb(dsn) else "server",
             version=client.server_version, database=settings.clickhouse_database)

    def open_client() -> Client:
        return clickhouse_connect.get_client(dsn=dsn, **kwargs)

    return Store(client, settings.clickhouse_database, dsn, open_client=open_client)
