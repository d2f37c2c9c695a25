"""The ClickHouse schema: infra/clickhouse/*.sql rendered (database, retention, partitioning)
and applied, then the rollups' materialized views, the live sections' backfill, the retention
the settings ask for and the migrations (docs/accounting.md, "Retention and migration")."""

from __future__ import annotations

import re
from pathlib import Path

from fleetplane.accounting import live, rollups
from fleetplane.accounting.store import Store, check_identifier
from fleetplane.core.logging import get_logger
from fleetplane.core.settings import REPO_ROOT, Settings

log = get_logger(__name__)

DDL_DIR = REPO_ROOT / "infra" / "clickhouse"
_PLACEHOLDER = re.compile(r"\{(database|ttl|audit_ttl|partition)\}")
PARTITIONS: dict[str, str] = {
    "month": "toYYYYMM(occurred_at)",
    "week": "toMonday(occurred_at)",
    "day": "toYYYYMMDD(occurred_at)",
}


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
    rollups.repair_recent(store, settings.accounting_repair_hours)
    return n
