"""Retention in the DDL: the raw analytics rows expire after clickhouse_ttl_days, the audit log
(`events`) only after its own clickhouse_audit_ttl_days (default: kept); the rollups never."""

from __future__ import annotations

from fleetplane.accounting.schema import ddl_statements
from fleetplane.accounting.sink import RecentIds
from fleetplane.core.settings import Settings


def create_of(statements: list[str], table: str) -> str:
    [stmt] = [s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS db.{table}\n")]
    return stmt


def test_the_default_keeps_the_audit_log_and_expires_raw_rows_after_90_days() -> None:
    settings = Settings()
    assert settings.clickhouse_ttl_days == 90 and settings.clickhouse_audit_ttl_days == 0
    ddl = ddl_statements("db", settings.clickhouse_ttl_days,
                         audit_ttl_days=settings.clickhouse_audit_ttl_days)
    assert "TTL" not in create_of(ddl, "events")
    for table in ("model_calls", "attempt_outcomes", "task_transitions", "utilization"):
        assert "INTERVAL 90 DAY" in create_of(ddl, table), table
    for rollup in ("model_calls_hourly", "attempts_hourly"):
        assert "TTL" not in create_of(ddl, rollup)


def test_an_audit_retention_applies_to_the_audit_log_alone() -> None:
    ddl = ddl_statements("db", 0, audit_ttl_days=2555)
    assert "INTERVAL 2555 DAY" in create_of(ddl, "events")
    assert "TTL" not in create_of(ddl, "model_calls")


def test_recent_ids_remember_the_last_ids_within_their_capacity() -> None:
    recent = RecentIds(capacity=4)
    recent.add(["a", "b"])          # a full generation (capacity/2) retires to the older one
    recent.add(["c"])
    assert recent.known({"a", "b", "c", "x"}) == {"a", "b", "c"}
    recent.add(["d"])               # the second generation fills: "a" and "b" are forgotten
    assert recent.known({"a", "b", "c", "d"}) == {"c", "d"}
