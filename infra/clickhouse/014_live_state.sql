-- Issue 18, fifth round: the dashboard's live sections read pre-aggregated, time-ordered rows
-- (docs/accounting.md, "Live sections"), not every lifecycle row of the last hour.
-- recent_task_states: one row per (UTC minute, task): `latest` encodes the task's latest state
-- among that minute's transitions in one UInt64 whose order is the task_states view's
-- (terminal, occurred_at, state_rank): bit 51 terminal, bits 9-50 occurred_at in ms, bits 5-8
-- state_rank, bits 0-4 the state's position in the list below (core.states.STATES, checked by
-- a test), so max() is the argMax and the state is decoded from the bits (live.py). Beside it:
-- first/last transition, first submission and first dispatch ("never" = 2200-01-01), the
-- times of the transitions that end a hold (held, dispatched, terminal) and the task's holds
-- (TaskHeld: time, kind, reason, held_by, event id). Every column merges duplicate-safe (max,
-- min, any, uniq arrays): task_transitions and holds are not deduplicated at the sink, a
-- redelivered row merges into the same answer. Plain columns (SimpleAggregateFunction): a
-- read merges them without deserializing aggregate states. A window of whole minutes is read
-- through the primary key and merged per task. Kept 2 days (the dashboard reads the last hour).
CREATE TABLE IF NOT EXISTS {database}.recent_task_states
(
    minute        DateTime('UTC'),
    task_id       String,
    team          SimpleAggregateFunction(any, LowCardinality(String)),
    task_type     SimpleAggregateFunction(max, LowCardinality(String)),
    latest        SimpleAggregateFunction(max, UInt64),
    first_at      SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    updated_at    SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    submitted_at  SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    dispatched_at SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    ends          SimpleAggregateFunction(groupUniqArrayArray, Array(DateTime64(3, 'UTC'))),
    holds         SimpleAggregateFunction(groupUniqArrayArray, Array(Tuple(DateTime64(3, 'UTC'), String, String, String, String)))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(minute)
ORDER BY (minute, task_id)
TTL minute + INTERVAL 2 DAY;
CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.recent_task_states_mv TO {database}.recent_task_states AS
SELECT toStartOfMinute(occurred_at) AS minute, task_id, any(team) AS team,
       max(task_type) AS task_type,
       max(bitShiftLeft(toUInt64(terminal), 51) + bitShiftLeft(toUInt64(toUnixTimestamp64Milli(occurred_at)), 9)
           + bitShiftLeft(toUInt64(state_rank), 5)
           + toUInt64(indexOf(['submitted', 'accepted', 'routed', 'held', 'dispatched', 'running',
                               'attempt_failed', 'retrying', 'escalated', 'rejected', 'completed',
                               'failed', 'abandoned', 'cancelled', 'rolled_back'], toString(st))))
           AS latest,
       min(occurred_at) AS first_at, max(occurred_at) AS updated_at,
       min(if(st = 'submitted', occurred_at, toDateTime64('2200-01-01 00:00:00', 3, 'UTC'))) AS submitted_at,
       min(if(st = 'dispatched', occurred_at, toDateTime64('2200-01-01 00:00:00', 3, 'UTC'))) AS dispatched_at,
       groupUniqArrayIf(occurred_at, st IN ('held', 'dispatched') OR terminal = 1) AS ends
FROM (SELECT task_id, team, task_type, state AS st, terminal, state_rank, occurred_at
      FROM {database}.task_transitions)
GROUP BY minute, task_id;
CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.recent_task_holds_mv TO {database}.recent_task_states AS
SELECT toStartOfMinute(occurred_at) AS minute, task_id, any(team) AS team,
       min(occurred_at) AS first_at, max(occurred_at) AS updated_at,
       toDateTime64('2200-01-01 00:00:00', 3, 'UTC') AS submitted_at,
       toDateTime64('2200-01-01 00:00:00', 3, 'UTC') AS dispatched_at,
       groupUniqArray((occurred_at, toString(kind), reason, held_by, event_id)) AS holds
FROM {database}.holds
GROUP BY minute, task_id;
-- Executor utilization per (UTC minute, executor process): the dashboard's series and
-- per-executor rows without reading every slot's 10-second window. utilization is
-- deduplicated at the sink (sums are exact); slots as a uniqExact state.
CREATE TABLE IF NOT EXISTS {database}.recent_utilization_minutes
(
    minute      DateTime('UTC'),
    executor_id LowCardinality(String),
    slots       AggregateFunction(uniqExact, UInt32),
    busy_s      SimpleAggregateFunction(sum, Float64),
    idle_s      SimpleAggregateFunction(sum, Float64),
    model_s     SimpleAggregateFunction(sum, Float64),
    tool_s      SimpleAggregateFunction(sum, Float64),
    attempts    SimpleAggregateFunction(sum, UInt64),
    last_report SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(minute)
ORDER BY (minute, executor_id)
TTL minute + INTERVAL 8 DAY;
CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.recent_utilization_minutes_mv TO {database}.recent_utilization_minutes AS
SELECT toStartOfMinute(window_start) AS minute, executor_id, uniqExactState(slot) AS slots,
       sum(busy_s) AS busy_s, sum(idle_s) AS idle_s, sum(model_s) AS model_s,
       sum(tool_s) AS tool_s, toUInt64(sum(attempts)) AS attempts,
       max(window_start) AS last_report
FROM {database}.utilization
GROUP BY minute, executor_id;
-- The time-ordered copies of every lifecycle row and utilization window that the live
-- sections read before (011_rollups.sql created them): no longer read, so no longer fed.
DROP VIEW IF EXISTS {database}.recent_transitions_mv;
DROP TABLE IF EXISTS {database}.recent_transitions;
DROP VIEW IF EXISTS {database}.recent_utilization_mv;
DROP TABLE IF EXISTS {database}.recent_utilization;
