-- task_states plus what the task's model calls cost (deduplicated with FINAL): cost comes from
-- the usage providers returned, never from estimates. Tasks without model calls cost 0.
CREATE OR REPLACE VIEW {database}.tasks AS
SELECT
    s.task_id AS task_id,
    s.team AS team,
    s.task_type AS task_type,
    s.state AS state,
    s.reason AS reason,
    s.model AS model,
    s.tier AS tier,
    s.attempts AS attempts,
    s.submitted_at AS submitted_at,
    s.updated_at AS updated_at,
    s.reported_cost_usd AS reported_cost_usd,
    m.cost_usd AS cost_usd,
    m.calls AS model_calls,
    m.input_tokens AS input_tokens,
    m.output_tokens AS output_tokens
FROM {database}.task_states AS s
LEFT JOIN
(
    SELECT
        task_id,
        sum(cost_usd) AS cost_usd,
        count() AS calls,
        sum(input_tokens) AS input_tokens,
        sum(output_tokens) AS output_tokens
    FROM {database}.model_calls FINAL
    GROUP BY task_id
) AS m ON s.task_id = m.task_id;
