-- One row per ModelCall event (audit.model_calls): the source of truth for cost and tokens.
-- Deduplicated like events: ReplacingMergeTree on a key that contains event_id; read with FINAL.
CREATE TABLE IF NOT EXISTS {database}.model_calls
(
    task_id                     String,
    team                        LowCardinality(String),
    attempt                     UInt32,
    call_index                  UInt32,
    model                       LowCardinality(String),
    provider                    LowCardinality(String),
    tier                        LowCardinality(String),
    input_tokens                UInt64,
    output_tokens               UInt64,
    cache_creation_input_tokens UInt64,
    cache_read_input_tokens     UInt64,
    cost_usd                    Float64,
    latency_ms                  Float64,
    outcome                     LowCardinality(String),
    error                       String,
    stop_reason                 LowCardinality(String),
    occurred_at                 DateTime64(3, 'UTC'),
    event_id                    String,
    ingested_at                 DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY {partition}
ORDER BY (team, task_id, event_id)
{ttl};
