-- One row per task with its latest state, from task_transitions alone. Every aggregate here is
-- insensitive to duplicate rows (argMax, max, min, any), so no FINAL is needed.
-- Latest state: a terminal state wins over any later non-terminal event (a late heartbeat or a
-- redelivered start), then the latest occurred_at, then the lifecycle rank (same-millisecond ties).
CREATE OR REPLACE VIEW {database}.task_states AS
SELECT
    task_id,
    any(team) AS team,
    argMaxIf(task_type, occurred_at, task_type != '') AS task_type,
    argMax(state, (terminal, occurred_at, state_rank)) AS state,
    argMax(reason, (terminal, occurred_at, state_rank)) AS reason,
    argMaxIf(model, occurred_at, model != '') AS model,
    argMaxIf(tier, occurred_at, tier != '') AS tier,
    max(attempt) AS attempts,
    min(occurred_at) AS submitted_at,
    max(occurred_at) AS updated_at,
    argMaxIf(cost_usd, occurred_at, terminal = 1) AS reported_cost_usd
FROM {database}.task_transitions
GROUP BY task_id;
