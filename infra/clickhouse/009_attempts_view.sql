-- One row per task attempt with its timeline (attempt 0 holds submission, acceptance and holds
-- before the first routing). Duplicate-safe aggregates only (min, max, argMax), no FINAL needed.
CREATE OR REPLACE VIEW {database}.attempts AS
SELECT
    task_id,
    attempt,
    any(team) AS team,
    argMaxIf(model, occurred_at, model != '') AS model,
    argMaxIf(tier, occurred_at, tier != '') AS tier,
    minIf(occurred_at, st = 'routed') AS routed_at,
    minIf(occurred_at, st = 'held') AS held_at,
    minIf(occurred_at, st = 'dispatched') AS dispatched_at,
    minIf(occurred_at, st = 'running') AS started_at,
    maxIf(occurred_at, st IN ('completed', 'failed', 'attempt_failed', 'abandoned',
                                 'cancelled', 'rolled_back', 'rejected')) AS finished_at,
    argMax(st, (terminal, occurred_at, state_rank)) AS state,
    countIf(st = 'held') AS holds
FROM (SELECT *, state AS st FROM {database}.task_transitions)
GROUP BY task_id, attempt;
