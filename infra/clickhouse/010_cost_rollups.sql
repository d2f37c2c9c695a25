-- Cost rollups per day, fed by materialized views on model_calls (incremental, cheap to read).
-- They count every inserted copy of a model call: exact figures come from model_calls FINAL;
-- a redelivery after a crash (at most one checkpoint interval) can inflate a rollup until
-- fleetplane.accounting.rollups.rebuild() recomputes it from the deduplicated table.
CREATE TABLE IF NOT EXISTS {database}.cost_daily_team
(
    day                         Date,
    team                        LowCardinality(String),
    model                       LowCardinality(String),
    tier                        LowCardinality(String),
    cost_usd                    Float64,
    calls                       UInt64,
    input_tokens                UInt64,
    output_tokens               UInt64,
    cache_creation_input_tokens UInt64,
    cache_read_input_tokens     UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, team, model, tier);
CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.cost_daily_team_mv TO {database}.cost_daily_team AS
SELECT toDate(occurred_at) AS day, team, model, tier, sum(cost_usd) AS cost_usd, count() AS calls,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(cache_creation_input_tokens) AS cache_creation_input_tokens,
       sum(cache_read_input_tokens) AS cache_read_input_tokens
FROM {database}.model_calls
GROUP BY day, team, model, tier;
CREATE TABLE IF NOT EXISTS {database}.cost_daily_task_type
(
    day       Date,
    task_type LowCardinality(String),
    team      LowCardinality(String),
    cost_usd  Float64,
    calls     UInt64,
    tokens    UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, task_type, team);
CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.cost_daily_task_type_mv TO {database}.cost_daily_task_type AS
SELECT toDate(occurred_at) AS day, task_type, team, sum(cost_usd) AS cost_usd, count() AS calls,
       sum(input_tokens + output_tokens + cache_creation_input_tokens + cache_read_input_tokens) AS tokens
FROM {database}.model_calls
GROUP BY day, task_type, team;
