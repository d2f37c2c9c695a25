-- fleetplane accounting schema. Applied in file-name order by fleetplane.accounting.store.apply_ddl
-- at every start of the accounting service: every statement is idempotent (IF NOT EXISTS / OR REPLACE).
-- Placeholders: {database} (Settings.clickhouse_database), {ttl} (a TTL clause or nothing).
-- Plain ClickHouse SQL only: the same files run on a ClickHouse server and on chdb.
CREATE DATABASE IF NOT EXISTS {database};
