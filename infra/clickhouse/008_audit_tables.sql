-- Fact tables of issue 6. Same dedup rule as events: ReplacingMergeTree whose sorting key ends in
-- event_id, partitioned by the event's own time; readers use FINAL.
CREATE TABLE IF NOT EXISTS {database}.tool_calls
(
    task_id     String,
    team        LowCardinality(String),
    attempt     UInt32,
    call_index  UInt32,
    tool        LowCardinality(String),
    outcome     LowCardinality(String),
    duration_ms Float64,
    occurred_at DateTime64(3, 'UTC'),
    event_id    String,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY {partition}
ORDER BY (team, task_id, event_id)
{ttl};
CREATE TABLE IF NOT EXISTS {database}.workspace_changes
(
    task_id     String,
    team        LowCardinality(String),
    attempt     UInt32,
    repository  String,
    branch      String,
    `commit`    String,
    files       Array(String),
    added       UInt64,
    removed     UInt64,
    occurred_at DateTime64(3, 'UTC'),
    event_id    String,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY {partition}
ORDER BY (repository, task_id, event_id)
{ttl};
-- One row per attempt outcome (TaskCompleted / TaskFailed): success statistics per model and
-- task type, anomaly baselines, and the audit chain heads.
CREATE TABLE IF NOT EXISTS {database}.attempt_outcomes
(
    task_id       String,
    team          LowCardinality(String),
    attempt       UInt32,
    event_type    LowCardinality(String),
    success       UInt8,
    final         UInt8,
    cached        UInt8,
    model         LowCardinality(String),
    failure_class LowCardinality(String),
    cost_usd      Float64,
    duration_ms   Float64,
    audit_head    String,
    audit_count   UInt32,
    occurred_at   DateTime64(3, 'UTC'),
    event_id      String,
    ingested_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY {partition}
ORDER BY (task_id, event_id)
{ttl};
-- One row per TaskHeld: a held period lasts until the task's next transition that is a hold,
-- a dispatch or a terminal state (see queries.held_time).
CREATE TABLE IF NOT EXISTS {database}.holds
(
    task_id     String,
    team        LowCardinality(String),
    attempt     UInt32,
    kind        LowCardinality(String),
    reason      String,
    held_by     String,
    occurred_at DateTime64(3, 'UTC'),
    event_id    String,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY {partition}
ORDER BY (task_id, event_id)
{ttl};
CREATE TABLE IF NOT EXISTS {database}.alerts
(
    team        LowCardinality(String),
    task_id     String,
    severity    LowCardinality(String),
    kind        LowCardinality(String),
    message     String,
    metric      String,
    value       Nullable(Float64),
    baseline    Nullable(Float64),
    occurred_at DateTime64(3, 'UTC'),
    event_id    String,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY {partition}
ORDER BY (team, event_id)
{ttl};
CREATE TABLE IF NOT EXISTS {database}.utilization
(
    executor_id  LowCardinality(String),
    slot         UInt32,
    window_start DateTime64(3, 'UTC'),
    window_s     Float64,
    model_s      Float64,
    tool_s       Float64,
    busy_s       Float64,
    idle_s       Float64,
    attempts     UInt32,
    occurred_at  DateTime64(3, 'UTC'),
    event_id     String,
    ingested_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY {partition}
ORDER BY (executor_id, slot, event_id)
{ttl};
