-- Issue 18, fourth round: distinct tasks are counted without merging task-id states per query.
-- model_calls.first_call is 1 on a task's first model call (lowest attempt, then call_index),
-- set by the sink (sink.py: _flag_first_calls); the rollups sum it as first_calls. "tasks" in
-- cost by team / task type / model / tier and in the what-ifs is then sum(first_calls): each
-- task counted once, in the hour and under the team, task type, model and tier of its first
-- model call (docs/accounting.md, "Counting tasks"). The older uniq state column `tasks` of
-- databases created before this file is no longer filled or read.
ALTER TABLE {database}.model_calls ADD COLUMN IF NOT EXISTS first_call UInt8 DEFAULT 0;
ALTER TABLE {database}.model_calls_hourly ADD COLUMN IF NOT EXISTS first_calls SimpleAggregateFunction(sum, UInt64) DEFAULT 0;
ALTER TABLE {database}.model_calls_daily ADD COLUMN IF NOT EXISTS first_calls SimpleAggregateFunction(sum, UInt64) DEFAULT 0;
