"""Robust anomaly scores, budget states and the analyst SQL parser check (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetplane.accounting.anomaly import (
    LeaveOneOut,
    attempt_anomalies,
    failure_rate_anomalies,
    robust_z,
)
from fleetplane.accounting.budgets import budget_state, changed, period_name, statuses
from fleetplane.accounting.sqlguard import SqlRefused, check_ast, normalize
from fleetplane.accounting.whatif import parse_share, wilson
from fleetplane.core.teams import TeamPolicy, parse_teams


def attempt(i: int, cost: float, task_type: str = "classify", success: int = 1,
            tokens: int = 1000, duration: float = 2000.0,
            model: str = "claude-haiku-4-5") -> dict[str, object]:
    return {"task_id": f"t{i}", "team": "a", "attempt": 1, "task_type": task_type,
            "model": model, "cost_usd": cost, "tokens": tokens, "duration_ms": duration,
            "success": success,
            "occurred_at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i)}


def test_robust_z_ignores_outliers_in_the_baseline() -> None:
    sample = [1.0, 1.1, 0.9, 1.05, 0.95, 100.0]   # one wild value does not move median/MAD
    score, median = robust_z(1.0, sample)
    assert median == pytest.approx(1.025)
    assert abs(score) < 1
    assert robust_z(5.0, sample)[0] > 3.5
    assert robust_z(2.0, [1.0] * 10)[0] == float("inf")   # MAD 0, value far from the median
    assert robust_z(1.0, [1.0] * 10)[0] == 0.0


def test_only_new_attempts_over_the_threshold_alert() -> None:
    rows = [attempt(i, 0.010 + 0.0001 * (i % 5)) for i in range(30)]
    rows.append(attempt(99, 0.5))
    rows.append(attempt(98, 0.0102, task_type="other"))
    new = {("t99", 1), ("t3", 1), ("t98", 1)}
    found = attempt_anomalies(rows, new_ids=new, min_samples=20, threshold=3.5)
    assert [(a.task_id, a.metric) for a in found] == [("t99", "cost_usd")]
    assert found[0].baseline == pytest.approx(0.0102)
    # too few samples: no verdict
    assert attempt_anomalies([*rows[:10], rows[30]], new_ids=new, min_samples=20,
                             threshold=3.5) == []


def test_a_task_type_routed_to_two_models_is_judged_per_model() -> None:
    """The router sends classify to a small and a frontier model: the frontier model's normal
    cost (30x) is no anomaly; an overrun on either model is."""
    small = [attempt(i, 0.010 + 0.0001 * (i % 5)) for i in range(30)]
    big = [attempt(100 + i, 0.30 + 0.003 * (i % 5), model="claude-opus-4-5") for i in range(25)]
    overrun = attempt(200, 1.5, model="claude-opus-4-5")
    rows = [*small, *big, overrun]
    new = {(r["task_id"], 1) for r in rows}  # type: ignore[misc]
    found = attempt_anomalies(rows, new_ids=new, min_samples=20, threshold=3.5)
    assert [(a.task_id, a.metric, a.model) for a in found] == [
        ("t200", "cost_usd", "claude-opus-4-5")]
    assert found[0].baseline == pytest.approx(0.306)


def test_an_overrun_under_twice_the_median_does_not_alert() -> None:
    """A tight baseline (within 1%) scores a 30% higher cost far above the threshold; it is not
    an overrun anyone acts on. Three times the median is."""
    rows = [attempt(i, 0.0100 + 0.00001 * (i % 5)) for i in range(30)]
    rows += [attempt(50, 0.013), attempt(51, 0.03)]
    new = {("t50", 1), ("t51", 1)}
    found = attempt_anomalies(rows, new_ids=new, min_samples=20, threshold=3.5)
    assert [(a.task_id, a.metric) for a in found] == [("t51", "cost_usd")]
    assert attempt_anomalies(rows, new_ids=new, min_samples=20, threshold=3.5,
                             min_ratio=1.0)[0].task_id == "t50"


def test_a_duration_overrun_must_also_be_long_in_seconds() -> None:
    """Sub-second attempts that took 5x their median under load are not anomalies; an agent
    task that ran 60 s against a 20 s median is."""
    short = [attempt(i, 0.01, duration=100.0 + (i % 5)) for i in range(30)]
    short.append(attempt(50, 0.01, duration=500.0))
    long = [attempt(100 + i, 0.01, task_type="refactor", duration=20_000.0 + 10 * (i % 5))
            for i in range(30)]
    long.append(attempt(150, 0.01, task_type="refactor", duration=60_000.0))
    found = attempt_anomalies([*short, *long], new_ids={("t50", 1), ("t150", 1)},
                              min_samples=20, threshold=3.5)
    assert [(a.task_id, a.metric) for a in found] == [("t150", "duration_ms")]


def test_failure_rate_of_the_newest_window_against_earlier_windows() -> None:
    rows = [attempt(i, 0.01, success=0 if i % 10 == 0 else 1) for i in range(100)]
    rows += [attempt(100 + i, 0.01, success=0 if i % 2 else 1) for i in range(20)]
    [a] = failure_rate_anomalies(rows, recent=20, min_windows=3, threshold=3.5)
    assert a.metric == "failure_rate"
    assert a.value == pytest.approx(0.5)
    assert a.baseline == pytest.approx(0.1)
    assert failure_rate_anomalies(rows[:100], recent=20, min_windows=3, threshold=3.5) == []


def test_budget_states_and_periods() -> None:
    policy = TeamPolicy(budget_usd=100, low_budget_share=0.2)
    assert [budget_state(policy, s) for s in (0, 79.9, 85, 100, 120)] == [
        "ok", "ok", "low", "exhausted", "exhausted"]
    now = datetime(2026, 11, 24, 15, 0, tzinfo=UTC)
    assert period_name("day", now) == "2026-11-24"
    assert period_name("week", now) == "2026-W48"
    assert period_name("month", now) == "2026-11"
    teams = parse_teams({"defaults": {"budget_usd": 10}, "teams": {
        "a": {"budget_usd": 100, "budget_period": "month"}}})
    out = {s.team: s for s in statuses(teams, {"month": {"a": 30.0}, "day": {"b": 9.5}}, now,
                                       ["b"])}
    assert (out["a"].spent_usd, out["a"].remaining_usd, out["a"].state) == (30.0, 70.0, "ok")
    assert (out["b"].period, out["b"].state) == ("2026-11-24", "low")
    assert out["a"].team == "a" and out["a"].task_id == ""
    assert not changed(out["a"], out["a"].model_copy(update={"spent_usd": 30.001}), 0.01)
    assert changed(out["a"], out["a"].model_copy(update={"spent_usd": 30.02}), 0.01)
    assert changed(None, out["a"], 0.01)


def test_wilson_interval_and_share_parsing() -> None:
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3)
    assert hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    assert [parse_share(s) for s in ("20%", "20", "0.2", "100%")] == pytest.approx(
        [0.2, 0.2, 0.2, 1.0])
    for bad in ("0", "-5%", "150%", "lots"):
        with pytest.raises(ValueError, match="shift"):
            parse_share(bad)


def test_sql_guard_text_and_ast_checks() -> None:
    assert normalize("  SELECT 1 ;; ") == "SELECT 1"
    for bad, reason in [("", "empty"), ("SELECT 1; SELECT 2", "one statement"),
                        ("SELECT 1 INTO OUTFILE 'x'", "OUTFILE")]:
        with pytest.raises(SqlRefused, match=reason):
            normalize(bad)
    check_ast(["SelectWithUnionQuery (children 1)", " TableExpression (children 1)",
               "  Function numbers (children 1)"])
    with pytest.raises(SqlRefused, match="Drop"):
        check_ast(["DropQuery d t (children 3)"])
    with pytest.raises(SqlRefused, match="url"):
        check_ast(["SelectWithUnionQuery (children 1)", " TableExpression (children 1)",
                   "  Function url (children 1)"])


values = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.25, 10.0, 1e6])
                  | st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=2,
                  max_size=40)


@given(values, st.data())
def test_a_leave_one_out_score_equals_robust_z_against_the_others(
        group: list[float], data: st.DataObject) -> None:
    """The one-sort baseline answers exactly what robust_z answers on the list without the
    value (duplicates, an even or odd count, MAD 0 included)."""
    i = data.draw(st.integers(0, len(group) - 1))
    others = group[:i] + group[i + 1:]
    assert LeaveOneOut(group).score(group[i]) == robust_z(group[i], others)


@given(st.lists(st.tuples(st.sampled_from(["classify", "refactor"]),
                          st.sampled_from(["m1", "m2"]),
                          st.floats(0, 1, allow_nan=False), st.integers(0, 5000),
                          st.floats(0, 90_000, allow_nan=False), st.booleans()),
                min_size=0, max_size=60),
       st.integers(0, 8))
def test_attempt_anomalies_equal_each_attempt_scored_against_a_list_of_the_others(
        spec: list[tuple[str, str, float, int, float, bool]], min_samples: int) -> None:
    """What attempt_anomalies finds equals the definition: every new attempt scored with
    robust_z against the other attempts of its type and model, metric by metric."""
    rows = [{**attempt(i, cost, task_type=t, tokens=tokens, duration=duration, model=m)}
            for i, (t, m, cost, tokens, duration, _) in enumerate(spec)]
    new = {(r["task_id"], 1) for r, s in zip(rows, spec, strict=True) if s[5]}
    found = attempt_anomalies(rows, new_ids=new, min_samples=min_samples, threshold=3.5,
                              min_duration_excess_ms=1000.0)
    expected = []
    for r in rows:
        if (r["task_id"], 1) not in new:
            continue
        others = [o for o in rows if o is not r and o["task_type"] == r["task_type"]
                  and o["model"] == r["model"]]
        if len(others) < max(min_samples, 1):
            continue
        for metric in ("cost_usd", "tokens", "duration_ms"):
            value = float(r[metric])  # type: ignore[arg-type]
            score, median = robust_z(value, [float(o[metric]) for o in others])  # type: ignore[arg-type]
            if metric == "duration_ms" and value - median < 1000.0:
                continue
            if score > 3.5 and value >= 2.0 * median:
                expected.append((r["task_id"], metric, value, median, score))
    assert sorted((a.task_id, a.metric, a.value, a.baseline, a.score) for a in found) == \
        sorted(expected)
