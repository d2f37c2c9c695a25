-- The record exactly as it was consumed (Avro single-object or registry wire format), beside the
-- JSON payload: an auditor can decode the original bytes with the schemas in schemas/.
ALTER TABLE {database}.events ADD COLUMN IF NOT EXISTS avro String CODEC(ZSTD(3)) AFTER payload;
-- The task type of a model call, resolved by the sink from the task's lifecycle events (empty
-- when the task's submission was not seen yet); feeds the cost-per-task-type rollup.
ALTER TABLE {database}.model_calls ADD COLUMN IF NOT EXISTS task_type LowCardinality(String) DEFAULT '' AFTER tier;
