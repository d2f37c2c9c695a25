-- The first cost rollups (issue 6): cost_daily_team (day x team x model x tier) and
-- cost_daily_task_type (day x task type x team), SummingMergeTree tables fed by materialized
-- views on model_calls. model_calls_daily (011_rollups.sql) holds the same sums per day x team x
-- task type x model x tier, is exact (repaired by rollups.repair_recent) and is what
-- /v1/cost/daily reads now (analytics.cost_daily). The two views cost every insert into
-- model_calls two more pipelines (about 6 us of the sink's 14 per model-call row, and 10 ms
-- of fixed cost per insert on chdb; docs/accounting.md, "Sink, sixteenth round"): a database
-- that has them loses them here.
DROP VIEW IF EXISTS {database}.cost_daily_team_mv;
DROP VIEW IF EXISTS {database}.cost_daily_task_type_mv;
DROP TABLE IF EXISTS {database}.cost_daily_team;
DROP TABLE IF EXISTS {database}.cost_daily_task_type;
