-- One row per state-changing lifecycle event (not heartbeats, model or tool calls).
-- `terminal` and `state_rank` order the states in the tasks view: a terminal state wins over a
-- later non-terminal event; state_rank only breaks ties within the same millisecond.
CREATE TABLE IF NOT EXISTS {database}.task_transitions
(
    task_id     String,
    team        LowCardinality(String),
    event_id    String,
    event_type  LowCardinality(String),
    state       LowCardinality(String),
    terminal    UInt8,
    state_rank  UInt8,
    occurred_at DateTime64(3, 'UTC'),
    attempt     UInt32,
    task_type   LowCardinality(String),
    model       LowCardinality(String),
    tier        LowCardinality(String),
    cost_usd    Float64,
    reason      String,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY {partition}
ORDER BY (task_id, event_id)
{ttl};
