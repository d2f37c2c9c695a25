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

from fleetplane.accounting.wire import tick_of, ticks, wire_type
from fleetplane.core.logging import get_logger
from fleetplane.core.settings import REPO_ROOT, Settings

log = get_logger(__name__)
T = TypeVar("T")
_METER_LOCK = threading.Lock()   # meters are shared by a store and its pool's threads

DDL_DIR = REPO_ROOT / "infra" / "clickhouse"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLACEHOLDER = re.compile(r"\{(database|ttl|audit_ttl|partition)\}")
PARTITIONS: dict[str, str] = {
    "month": "toYYYYMM(occurred_at)",
    "week": "toMonday(occurred_at)",
    "day": "toYYYYMMDD(occurred_at)",
}


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
        key = (table, tuple(column_names))
        with self.lock:
            # A cached insert context spares a DESCRIBE TABLE round trip per insert; its
            # column types are the wire types (wire.py), with the DateTime64 ticks.
            cached = self._insert_contexts.get(key)
            if cached is None:
                cached = self._insert_context(table, column_names)
                self._insert_contexts[key] = cached
            context, tick = cached
            if len(rows[0]) != len(tick):
                raise ValueError(f"{table}: rows of {len(rows[0])} values for {len(tick)} columns")
            try:
                # Columnar: one list per column (itemgetter over the rows, in C); the driver
                # then serializes each column without visiting rows.
                columns = [ticks(c, t) if t is not None else c for c, t in
                           zip(map(_column, range(len(tick)), repeat(rows)), tick, strict=True)]
                self.client.insert(data=columns, context=context)
            except Exception:
                self._insert_contexts.pop(key, None)
                raise

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


def ttl_clause(ttl_days: int) -> str:
    """The TTL clause of the fact tables (nothing when ttl_days <= 0: keep forever)."""
    if ttl_days <= 0:
        return ""
    return f"TTL toDateTime(occurred_at) + INTERVAL {int(ttl_days)} DAY"


def partition_clause(partition: str) -> str:
    """The partition key expression of the fact tables for a granularity (month, week, day)."""
    try:
        return PARTITIONS[partition]
    except KeyError:
        raise ValueError(
            f"partition must be one of {sorted(PARTITIONS)}, not {partition!r}") from None


def render(sql: str, database: str, ttl_days: int = 0, partition: str = "month",
           audit_ttl_days: int = 0) -> str:
    """Substitute the DDL placeholders ({database}, {ttl}, {audit_ttl}, {partition})."""
    values = {"database": check_identifier(database), "ttl": ttl_clause(ttl_days),
              "audit_ttl": ttl_clause(audit_ttl_days),
              "partition": partition_clause(partition)}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], sql)


def split_statements(sql: str) -> list[str]:
    """Split a DDL file on semicolons that end a line; drop comment-only lines."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    statements: list[str] = []
    current: list[str] = []
    for line in lines:
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current).strip().rstrip(";").strip())
            current = []
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return [s for s in statements if s]


def ddl_statements(database: str, ttl_days: int = 0, ddl_dir: Path = DDL_DIR,
                   partition: str = "month", audit_ttl_days: int = 0) -> list[str]:
    """Every statement of infra/clickhouse/*.sql in file-name order, rendered."""
    files = sorted(ddl_dir.glob("*.sql"))
    if not files:
        raise FileNotFoundError(f"no DDL files in {ddl_dir}")
    out: list[str] = []
    for path in files:
        out.extend(split_statements(render(path.read_text(), database, ttl_days, partition,
                                           audit_ttl_days)))
    return out


def apply_ddl(store: Store, ttl_days: int = 0, ddl_dir: Path = DDL_DIR,
              partition: str = "month", audit_ttl_days: int = 0) -> int:
    """Create the database, tables and views (idempotent); returns the statement count.

    Partitioning applies to tables created now; an existing table keeps its partition key.
    Retention follows the settings on every start (apply_ttl), also on existing tables."""
    statements = ddl_statements(store.database, ttl_days, ddl_dir, partition, audit_ttl_days)
    for statement in statements:
        store.command(statement)
    if ddl_dir == DDL_DIR:
        from fleetplane.accounting import live, rollups

        replaced = rollups.create_views(store)
        live.backfill(store)
        apply_ttl(store, ttl_days, audit_ttl_days)
        if not rollups.migrate(store) and replaced:
            rollups.backfill_first_calls(store)
    log.info("clickhouse schema applied", statements=len(statements), database=store.database)
    return len(statements)


# The raw fact tables: their rows expire after the configured TTL (the rollups are kept).
FACT_TABLES: tuple[str, ...] = (
    "model_calls", "task_transitions", "tool_calls", "workspace_changes",
    "attempt_outcomes", "holds", "alerts", "utilization")
#: the audit log: every event as consumed; its own retention (default: kept)
AUDIT_TABLES: tuple[str, ...] = ("events",)


def has_ttl(store: Store, table: str) -> bool:
    """Whether a table carries a TTL now."""
    create = str(store.command(
        "SELECT create_table_query FROM system.tables WHERE database = {db:String} "
        "AND name = {name:String}", {"db": store.database, "name": table}))
    return " TTL " in create


def apply_ttl(store: Store, ttl_days: int, audit_ttl_days: int = 0) -> None:
    """Make the tables' TTL what the settings say: the raw fact tables `ttl_days`, the audit
    log `audit_ttl_days`; 0 removes a TTL an earlier start set (issue 18's first version set
    90 days on `events` too). Metadata only: expired rows are dropped by later merges, nothing
    is rewritten now."""
    for tables, days in ((FACT_TABLES, ttl_days), (AUDIT_TABLES, audit_ttl_days)):
        for table in tables:
            if days > 0:
                clause = ttl_clause(days).removeprefix("TTL ")
                store.command(f"ALTER TABLE {store.table(table)} MODIFY TTL {clause} "
                              "SETTINGS materialize_ttl_after_modify = 0")
            elif has_ttl(store, table):
                store.command(f"ALTER TABLE {store.table(table)} REMOVE TTL")
                log.info("TTL removed: rows are kept", table=table)


def apply_settings_ddl(store: Store, settings: Settings) -> int:
    """apply_ddl with the retention and partitioning of `settings` (the service's start), then
    the recent rollup buckets recounted from raw rows (rollups.repair_recent: what a crash
    during an insert left out of the materialized views)."""
    n = apply_ddl(store, settings.clickhouse_ttl_days, partition=settings.clickhouse_partition,
                  audit_ttl_days=settings.clickhouse_audit_ttl_days)
    from fleetplane.accounting import rollups

    rollups.repair_recent(store, settings.accounting_repair_hours)
    return n
