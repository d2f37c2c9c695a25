"""What-if: "move X% of task type T (or of all work of a tier) to model B".

Cost: the recorded model calls of the selected work are re-priced at B's catalog prices with the
same token counts (input, output, cache writes, cache reads); the change is X% of the difference.
Success: per task type, B's observed success rate on that type (non-cached attempts that ran on
B) with a Wilson score interval; the expected successes lost are
``X% * tasks * (success rate of the current models - B's rate)``, its interval from B's interval.
With no attempts of B on a type, B's rate is unknown: no point estimate for that type (it is
listed in `task_types_without_success_data`), and its interval uses [0, 1] for B's rate.
Token counts on another model would differ (tokenizers, verbosity): the estimate assumes the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fleetplane.accounting import rollups
from fleetplane.accounting.store import Store
from fleetplane.core.catalog import Catalog, Model

Z95 = 1.959963984540054


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ((0, 1) without trials)."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Selection:
    share: float                     # 0..1
    target: Model
    from_tier: str | None = None
    from_model: str | None = None
    task_type: str | None = None

    def describe(self) -> str:
        parts = [self.task_type and f"task type {self.task_type}",
                 self.from_tier and f"tier {self.from_tier}",
                 self.from_model and f"model {self.from_model}"]
        what = ", ".join(p for p in parts if p) or "all work"
        return f"{self.share:.0%} of {what} -> {self.target.name}"


def parse_share(text: str) -> float:
    """'20%', '20' or '0.2' -> 0.2 (0 < share <= 1)."""
    raw = text.strip()
    try:
        value = float(raw.rstrip("%"))
    except ValueError:
        raise ValueError(f"shift must be a percentage like 20%, not {text!r}") from None
    if raw.endswith("%") or value > 1:
        value /= 100
    if not 0 < value <= 1:
        raise ValueError(f"shift must be between 0% and 100%, not {text!r}")
    return value


def resolve_target(catalog: Catalog, to_model: str | None, to_tier: str | None) -> Model:
    if to_model:
        return catalog.model(to_model)
    if to_tier:
        if to_tier not in catalog.tiers:
            raise KeyError(f"tier {to_tier!r} is not in the catalog ({', '.join(catalog.tiers)})")
        return catalog.default_model(to_tier)
    raise ValueError("give a target: --to TIER or --to-model MODEL")


def _typed_calls(store: Store) -> str:
    """Model calls (deduplicated) with their task type."""
    return (f"(SELECT m.task_id AS task_id, m.attempt AS attempt, m.call_index AS call_index, "
            f"m.model AS model, m.tier AS tier, m.cost_usd AS cost_usd, "
            f"m.input_tokens AS input_tokens, m.output_tokens AS output_tokens, "
            f"m.cache_creation_input_tokens AS cache_creation_input_tokens, "
            f"m.cache_read_input_tokens AS cache_read_input_tokens, "
            f"m.task_type AS type, {rollups.FIRST_CALL_WINDOW} AS first "
            f"FROM {store.table('model_calls')} AS m FINAL)")


def _selected_calls(store: Store, sel: Selection, source: str = "rollup"
                    ) -> list[dict[str, Any]]:
    clauses: list[str] = ["model != {target:String}"]
    params: dict[str, Any] = {"target": sel.target.name}
    if sel.from_tier:
        clauses.append("tier = {tier:String}")
        params["tier"] = sel.from_tier
    if sel.from_model:
        clauses.append("model = {model:String}")
        params["model"] = sel.from_model
    if sel.task_type:
        clauses.append("type = {task_type:String}")
        params["task_type"] = sel.task_type
    if source != "raw":
        src = rollups.calls_source(store, params=params)
        return store.query(
            f"""
            SELECT toString(task_type) AS task_type, toString(model) AS model,
                   sum(cost_usd) AS cost_usd, sum(calls) AS calls, sum(first_calls) AS tasks,
                   sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                   sum(cache_creation_input_tokens) AS cache_write_tokens,
                   sum(cache_read_input_tokens) AS cache_read_tokens
            FROM (SELECT *, task_type AS type FROM {src})
            WHERE {' AND '.join(clauses)}
            GROUP BY task_type, model
            """, params)
    return store.query(
        f"""
        SELECT type AS task_type, model, sum(cost_usd) AS cost_usd, count() AS calls,
               toUInt64(countIf(first)) AS tasks, sum(input_tokens) AS input_tokens,
               sum(output_tokens) AS output_tokens,
               sum(cache_creation_input_tokens) AS cache_write_tokens,
               sum(cache_read_input_tokens) AS cache_read_tokens
        FROM {_typed_calls(store)}
        WHERE {' AND '.join(clauses)}
        GROUP BY type, model
        """, params)


def success_stats(store: Store, task_types: list[str] | None, source: str = "rollup"
                  ) -> dict[tuple[str, str], tuple[int, int]]:
    """(task type, model) -> (successes, trials): finished non-cached attempts, each counted
    for the model its model calls went to (an attempt that never called a model says nothing
    about one), for the task types given (None: every type; rollup only). From the attempts
    rollup (the sink resolves each outcome's call model); `source="raw"` joins the raw rows."""
    if source != "raw":
        params: dict[str, Any] = {}
        src = rollups.attempts_source(store, params=params)
        types = ""
        if task_types is not None:
            types = "AND task_type IN {types:Array(String)} "
            params["types"] = task_types
        rows = store.query(
            f"SELECT toString(task_type) AS task_type, toString(model) AS model, "
            f"sum(successes) AS successes, sum(attempts) AS trials FROM {src} "
            f"WHERE cached = 0 AND model != '' {types}"
            "GROUP BY task_type, model", params)
        return {(r["task_type"], r["model"]): (int(r["successes"]), int(r["trials"]))
                for r in rows}
    rows = store.query(
        f"""
        SELECT c.call_type AS task_type, c.call_model AS model,
               countIf(o.success = 1) AS successes, count() AS trials
        FROM (SELECT task_id, attempt, any(type) AS call_type,
                     argMax(model, call_index) AS call_model
              FROM {_typed_calls(store)} WHERE type IN {{types:Array(String)}}
              GROUP BY task_id, attempt) AS c
        INNER JOIN (SELECT task_id, attempt, max(success) AS success
                    FROM {store.table('attempt_outcomes')} FINAL
                    WHERE cached = 0 GROUP BY task_id, attempt) AS o
            ON c.task_id = o.task_id AND c.attempt = o.attempt
        GROUP BY task_type, model
        """, {"types": task_types or []})
    return {(r["task_type"], r["model"]): (int(r["successes"]), int(r["trials"])) for r in rows}


def what_if(store: Store, catalog: Catalog, sel: Selection, source: str = "rollup"
            ) -> dict[str, Any]:
    """The cost change and expected successes lost of moving sel.share of the work to B
    (from the rollups; source="raw": from the raw rows, for audit and tests)."""
    if source == "raw":
        calls = _selected_calls(store, sel, source)
        types = sorted({r["task_type"] for r in calls})
        stats = success_stats(store, types, source) if types else {}
    else:
        # two rollup reads at once: the selected calls, and the success counts of every task
        # type (the rollup is small; the types are known only after the first read)
        both: dict[str, Any] = store.parallel({
            "calls": lambda s: _selected_calls(s, sel, source),
            "stats": lambda s: success_stats(s, None, source)}, readers=2)
        calls, stats = both["calls"], both["stats"]
    prices = sel.target.prices
    per_type: dict[str, dict[str, Any]] = {}
    for r in calls:
        row = per_type.setdefault(r["task_type"], {
            "task_type": r["task_type"], "tasks": 0, "calls": 0, "cost_usd": 0.0,
            "repriced_usd": 0.0, "successes": 0, "trials": 0, "models": []})
        repriced = (int(r["input_tokens"]) * prices.input
                    + int(r["output_tokens"]) * prices.output
                    + int(r["cache_write_tokens"]) * prices.cache_write
                    + int(r["cache_read_tokens"]) * prices.cache_read)
        row["tasks"] += int(r["tasks"])
        row["calls"] += int(r["calls"])
        row["cost_usd"] += float(r["cost_usd"])
        row["repriced_usd"] += repriced
        ok, n = stats.get((r["task_type"], r["model"]), (0, 0))
        row["successes"] += ok
        row["trials"] += n
        row["models"].append(r["model"])
    out = []
    for row in sorted(per_type.values(), key=lambda x: -x["cost_usd"]):
        b_ok, b_n = stats.get((row["task_type"], sel.target.name), (0, 0))
        lo, hi = wilson(b_ok, b_n)
        current = row["successes"] / row["trials"] if row["trials"] else None
        moved = sel.share * row["tasks"]
        b_rate = b_ok / b_n if b_n else None
        row.update({
            "moved_tasks": moved,
            "cost_change_usd": sel.share * (row["repriced_usd"] - row["cost_usd"]),
            "current_success_rate": current,
            "b_successes": b_ok, "b_trials": b_n, "b_success_rate": b_rate,
            "b_interval": [lo, hi],
        })
        row["successes_lost_interval"] = (
            [moved * (current - hi), moved * (current - lo)] if current is not None else None)
        row["expected_successes_lost"] = (
            moved * (current - b_rate) if current is not None and b_rate is not None else None)
        out.append(row)
    known = [r for r in out if r["expected_successes_lost"] is not None]
    bounded = [r for r in out if r["successes_lost_interval"] is not None]
    cost = sum(r["cost_usd"] for r in out)
    change = sum(r["cost_change_usd"] for r in out)
    return {
        "scenario": sel.describe(),
        "share": sel.share,
        "target_model": sel.target.name,
        "target_tier": sel.target.tier,
        "selected_cost_usd": cost,
        "cost_change_usd": change,
        "cost_change_pct": change / cost if cost else 0.0,
        "moved_tasks": sum(r["moved_tasks"] for r in out),
        "expected_successes_lost": sum(r["expected_successes_lost"] for r in known),
        "successes_lost_interval": [
            sum(r["successes_lost_interval"][0] for r in bounded),
            sum(r["successes_lost_interval"][1] for r in bounded)],
        "task_types_without_success_data": [r["task_type"] for r in out
                                            if r["expected_successes_lost"] is None],
        "by_task_type": out,
    }
