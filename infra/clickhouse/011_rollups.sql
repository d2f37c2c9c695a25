-- Issue 18: rollups the analytics and the dashboard read (docs/accounting.md, "Rollups").
-- Their materialized views (model_calls_hourly_mv, attempts_hourly_mv and the *_daily_mv ones)
-- are created by fleetplane.accounting.rollups.create_views from the one select list per rollup
-- that also aggregates raw rows for partial hours and rebuilds the rollups.
-- The sink deduplicates model_calls and attempt_outcomes by event_id before inserting, so every
-- row reaches these materialized views once: the rollups are exact without FINAL.
-- Rollups have no TTL: they are kept when raw rows expire.
-- The task type and the model of an attempt, resolved by the sink (see sink.py): success counts
-- per model and task type for the what-if come from these columns.
ALTER TABLE {database}.attempt_outcomes ADD COLUMN IF NOT EXISTS task_type LowCardinality(String) DEFAULT '';
ALTER TABLE {database}.attempt_outcomes ADD COLUMN IF NOT EXISTS call_model LowCardinality(String) DEFAULT '';
ALTER TABLE {database}.attempt_outcomes ADD COLUMN IF NOT EXISTS tier LowCardinality(String) DEFAULT '';
-- The sink's duplicate lookup reads event ids of a time range: a bloom filter on event_id keeps
-- that lookup from reading the whole table.
ALTER TABLE {database}.model_calls ADD INDEX IF NOT EXISTS event_id_bf event_id TYPE bloom_filter(0.01) GRANULARITY 1;
ALTER TABLE {database}.attempt_outcomes ADD INDEX IF NOT EXISTS event_id_bf event_id TYPE bloom_filter(0.01) GRANULARITY 1;
-- Model calls per hour x team x task type x model x tier.
-- Distinct tasks: first_calls (013_first_calls.sql), the count of tasks' first model calls.
CREATE TABLE IF NOT EXISTS {database}.model_calls_hourly
(
    hour                        DateTime('UTC'),
    team                        LowCardinality(String),
    task_type                   LowCardinality(String),
    model                       LowCardinality(String),
    tier                        LowCardinality(String),
    calls                       SimpleAggregateFunction(sum, UInt64),
    errors                      SimpleAggregateFunction(sum, UInt64),
    cost_usd                    SimpleAggregateFunction(sum, Float64),
    input_tokens                SimpleAggregateFunction(sum, UInt64),
    output_tokens               SimpleAggregateFunction(sum, UInt64),
    cache_creation_input_tokens SimpleAggregateFunction(sum, UInt64),
    cache_read_input_tokens     SimpleAggregateFunction(sum, UInt64),
    latency_ms                  SimpleAggregateFunction(sum, Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, team, task_type, model, tier);
-- Attempt outcomes per hour x team x task type x model (of the attempt's model calls) x tier x
-- cached: attempts, successes, final outcomes (finished tasks), durations.
CREATE TABLE IF NOT EXISTS {database}.attempts_hourly
(
    hour        DateTime('UTC'),
    team        LowCardinality(String),
    task_type   LowCardinality(String),
    model       LowCardinality(String),
    tier        LowCardinality(String),
    cached      UInt8,
    attempts    SimpleAggregateFunction(sum, UInt64),
    successes   SimpleAggregateFunction(sum, UInt64),
    finished    SimpleAggregateFunction(sum, UInt64),
    duration_ms SimpleAggregateFunction(sum, Float64),
    reported_cost_usd SimpleAggregateFunction(sum, Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, team, task_type, model, tier, cached);
-- (The time-ordered copies recent_transitions and recent_utilization that stood here were
-- replaced by the per-minute live tables of 014_live_state.sql, which drops them.)
ALTER TABLE {database}.utilization ADD INDEX IF NOT EXISTS event_id_bf event_id TYPE bloom_filter(0.01) GRANULARITY 1;
-- The same two rollups per UTC day: questions over days, weeks and months (and the dashboard's
-- all-time figures) read ~24x fewer rows. A window reads whole days from these, whole hours
-- from the hourly ones, and raw rows only for partial hours at its ends (rollups.py).
CREATE TABLE IF NOT EXISTS {database}.model_calls_daily AS {database}.model_calls_hourly
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, team, task_type, model, tier);
CREATE TABLE IF NOT EXISTS {database}.attempts_daily AS {database}.attempts_hourly
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, team, task_type, model, tier, cached);
