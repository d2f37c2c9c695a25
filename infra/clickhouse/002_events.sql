-- Every event from every topic, as consumed (the audit log; replay source for task timelines).
-- Delivery is at-least-once: ReplacingMergeTree collapses rows with the same sorting key, and
-- (task_id, event_id) is as unique as event_id because an event's task_id never changes.
-- Readers use FINAL (or GROUP BY event_id) until background merges have caught up.
-- The partition key is derived from the event itself, so duplicates land in the same partition.
-- Retention: {audit_ttl} (FLEETPLANE_CLICKHOUSE_AUDIT_TTL_DAYS, default 0: kept), not the raw
-- fact tables' TTL: auditors rely on this log.
CREATE TABLE IF NOT EXISTS {database}.events
(
    event_id       String,
    event_type     LowCardinality(String),
    task_id        String,
    team           LowCardinality(String),
    occurred_at    DateTime64(3, 'UTC'),
    schema_version UInt16,
    causation_id   String,
    topic          LowCardinality(String),
    `partition`    UInt32,
    `offset`       UInt64,
    payload        String CODEC(ZSTD(3)),
    ingested_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY {partition}
ORDER BY (task_id, event_id)
{audit_ttl};
