"""The ClickHouse connection: chdb (in-process, ``chdb:///abs/dir``) or a server (``http(s)://``).

One ``Store`` per process. The processor loop (inserts) and the HTTP threads (queries) share it,
so every call holds a lock: a chdb connection handle serves one call at a time, and a server
session may not run two queries at once either.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.insert import InsertContext

from fleetplane.core.logging import get_logger
from fleetplane.core.settings import REPO_ROOT, Settings

log = get_logger(__name__)

DDL_DIR = REPO_ROOT / "infra" / "clickhouse"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLACEHOLDER = re.compile(r"\{(database|ttl|partition)\}")
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


class Store:
    """A locked ClickHouse client bound to the fleetplane database."""

    def __init__(self, client: Client, database: str, dsn: str = "",
                 lock: threading.RLock | None = None) -> None:
        self.client = client
        self.database = check_identifier(database)
        self.dsn = dsn
        self.lock = lock or threading.RLock()
        self._insert_contexts: dict[tuple[str, tuple[str, ...]], InsertContext] = {}

    def with_database(self, database: str) -> Store:
        """A Store on the same client and lock, bound to another database."""
        return Store(self.client, database, self.dsn, self.lock)

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
            return list(result.named_results())

    def query_rows(self, sql: str, parameters: Mapping[str, Any] | None = None
                   ) -> list[Sequence[Any]]:
        """Rows as sequences."""
        with self.lock:
            return list(self.client.query(sql, parameters=dict(parameters or {})).result_rows)

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
            return list(result.column_names), [list(r) for r in result.result_rows]

    def insert(self, table: str, rows: Sequence[Sequence[Any]],
               column_names: Sequence[str]) -> None:
        if not rows:
            return
        key = (table, tuple(column_names))
        with self.lock:
            # A cached insert context spares a DESCRIBE TABLE round trip per insert.
            context = self._insert_contexts.get(key)
            if context is None:
                context = self.client.create_insert_context(self.table(table),
                                                            column_names=list(column_names),
                                                            column_oriented=True)
                self._insert_contexts[key] = context
            try:
                # Columnar: one list per column (zip runs in C); the driver then serializes
                # each column without visiting rows.
                columns = [list(c) for c in zip(*rows, strict=True)]
                self.client.insert(data=columns, context=context)
            except Exception:
                self._insert_contexts.pop(key, None)
                raise

    def ping(self) -> bool:
        try:
            with self.lock:
                return bool(self.client.command("SELECT 1") == 1)
        except Exception:
            log.warning("clickhouse ping failed", exc_info=True)
            return False

    def close(self) -> None:
        with self.lock:
            self.client.close()


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
    return Store(client, settings.clickhouse_database, dsn)


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


def render(sql: str, database: str, ttl_days: int = 0, partition: str = "month") -> str:
    """Substitute the DDL placeholders ({database}, {ttl}, {partition})."""
    values = {"database": check_identifier(database), "ttl": ttl_clause(ttl_days),
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
                   partition: str = "month") -> list[str]:
    """Every statement of infra/clickhouse/*.sql in file-name order, rendered."""
    files = sorted(ddl_dir.glob("*.sql"))
    if not files:
        raise FileNotFoundError(f"no DDL files in {ddl_dir}")
    out: list[str] = []
    for path in files:
        out.extend(split_statements(render(path.read_text(), database, ttl_days, partition)))
    return out


def apply_ddl(store: Store, ttl_days: int = 0, ddl_dir: Path = DDL_DIR,
              partition: str = "month") -> int:
    """Create the database, tables and views (idempotent); returns the statement count.

    Partitioning applies to tables created now; an existing table keeps its partition key."""
    statements = ddl_statements(store.database, ttl_days, ddl_dir, partition)
    for statement in statements:
        store.command(statement)
    if ttl_days > 0 and ddl_dir == DDL_DIR:
        apply_ttl(store, ttl_days)
    if ddl_dir == DDL_DIR:
        from fleetplane.accounting import rollups

        rollups.migrate(store)
    log.info("clickhouse schema applied", statements=len(statements), database=store.database)
    return len(statements)


# The raw fact tables: their rows expire after the configured TTL (the rollups are kept).
FACT_TABLES: tuple[str, ...] = (
    "events", "model_calls", "task_transitions", "tool_calls", "workspace_changes",
    "attempt_outcomes", "holds", "alerts", "utilization")


def apply_ttl(store: Store, ttl_days: int) -> None:
    """Set the raw-row TTL on existing fact tables (tables created before it, or with another
    value). Metadata only: expired rows are dropped by later merges, not rewritten now."""
    clause = ttl_clause(ttl_days).removeprefix("TTL ")
    for table in FACT_TABLES:
        store.command(f"ALTER TABLE {store.table(table)} MODIFY TTL {clause} "
                      "SETTINGS materialize_ttl_after_modify = 0")


def settings_ttl_days(settings: Settings) -> int:
    """Row TTL in days; 0 keeps rows forever."""
    return settings.clickhouse_ttl_days
