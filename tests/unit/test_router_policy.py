"""The pure routing policy: exploration bounds, Thompson sampling, posteriors, cache keys."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from fleetplane.core.catalog import catalog_for
from fleetplane.core.events import TaskSpec
from fleetplane.core.settings import Settings
from fleetplane.router.cache import cache_key, not_cacheable
from fleetplane.router.policy import BudgetView, PolicyConfig, choose, explores
from fleetplane.router.stats import ModelStats, OutcomeStats


def catalog():  # type: ignore[no-untyped-def]
    return catalog_for(Settings().catalog_file)


def spec(**fields: Any) -> TaskSpec:
    base: dict[str, Any] = {"name": "n", "task_type": "codegen", "prompt": "write a parser"}
    base.update(fields)
    return TaskSpec(**base)


def stats_with(**per_model: tuple[int, int]) -> OutcomeStats:
    stats = OutcomeStats()
    for model, (ok, bad) in per_model.items():
        for i in range(ok + bad):
            stats.record("codegen", model.replace("_", "-"), i < ok, 0.05)
    return stats


@pytest.mark.parametrize("share", [0.0, 0.05, 0.1, 0.3])
def test_exploration_share_is_bounded_and_deterministic(share: float) -> None:
    keys = [f"task-{i}/1" for i in range(20_000)]
    explored = sum(explores(k, share) for k in keys)
    assert explored <= share * len(keys) * 1.05 + 10
    assert explored >= share * len(keys) * 0.95 - 10
    assert [explores(k, share) for k in keys[:500]] == [explores(k, share) for k in keys[:500]]


def test_exploring_decisions_follow_thompson_samples_and_never_break_capabilities() -> None:
    cat = catalog()
    stats = stats_with(claude_sonnet_4_6=(40, 2))  # the known-good standard model
    cfg = PolicyConfig(exploration_share=1.0)  # every decision explores
    picks = Counter()
    for i in range(1000):
        d = choose(cat, spec(allowed_tools=["grep"]), stats, key=f"t{i}/1", cfg=cfg)
        assert d.explored and d.model.tool_use
        picks[d.model.name] += 1
    # untried cheap models get tried (uniform prior: P(sample >= 0.8) = 0.2 each) ...
    assert picks["gpt-4o-mini"] > 100 and picks["claude-haiku-4-5"] > 50
    # ... and the proven model takes the rest; the no-tool model never
    assert picks["claude-sonnet-4-6"] > 250 and "fleet-local-coder" not in picks
    # the same key gives the same decision
    a = choose(cat, spec(), stats, key="same/1", cfg=cfg)
    b = choose(cat, spec(), stats, key="same/1", cfg=cfg)
    assert (a.model, a.reason) == (b.model, b.reason)


def test_a_model_proven_bad_is_rarely_explored() -> None:
    stats = stats_with(fleet_local_coder=(2, 60), gpt_4o_mini=(2, 60), claude_haiku_4_5=(2, 60))
    cfg = PolicyConfig(exploration_share=1.0)
    picks = Counter(choose(catalog(), spec(), stats, key=f"b{i}/1", cfg=cfg).model.tier
                    for i in range(500))
    assert picks["small"] < 5


def test_exploit_share_of_traffic_stays_with_the_conservative_choice() -> None:
    stats = stats_with(claude_sonnet_4_6=(50, 1))
    cfg = PolicyConfig(exploration_share=0.1)
    decisions = [choose(catalog(), spec(), stats, key=f"e{i}/1", cfg=cfg) for i in range(1500)]
    explored = [d for d in decisions if d.explored]
    assert 0.07 * 1500 < len(explored) < 0.13 * 1500
    assert all(d.model.name == "claude-sonnet-4-6" for d in decisions if not d.explored)
    assert all(d.rule == "explore" or "no Thompson sample" in d.reason for d in explored)


def test_low_budget_judges_by_the_mean_and_stops_exploring() -> None:
    stats = stats_with(gpt_4o_mini=(17, 3))  # mean 0.82, conservative ~0.74 against 0.8
    cfg = PolicyConfig(exploration_share=1.0)
    d = choose(catalog(), spec(), stats, key="x/1", cfg=cfg, budget=BudgetView(low=True))
    assert d.model.name == "gpt-4o-mini" and not d.explored


def test_posterior_estimates() -> None:
    s = ModelStats(successes=10, failures=0)
    assert s.mean == pytest.approx(11 / 12)
    assert s.lower(1.0) < s.mean and s.lower(0.0) == s.mean
    assert ModelStats().mean == 0.5 and ModelStats().mean_cost_usd is None


def test_cache_key_rules() -> None:
    base = spec(task_type="translate", prompt="Translate to French: hello")
    k = cache_key(base, "small", "a")
    assert k == cache_key(spec(task_type="translate", prompt="Translate to French: hello"),
                          "small", "a")
    assert k != cache_key(spec(task_type="translate", prompt="Translate to German: hello"),
                          "small", "a")
    assert k != cache_key(base, "standard", "a")
    assert k != cache_key(base, "small", "b")
    assert cache_key(base, "small", "a", scope="fleet") == cache_key(base, "small", "b",
                                                                      scope="fleet")
    # tool order does not matter; the tool set does
    t1 = cache_key(spec(allowed_tools=["grep", "read_file"]), "small", "a")
    assert t1 == cache_key(spec(allowed_tools=["read_file", "grep"]), "small", "a")
    assert t1 != cache_key(spec(allowed_tools=["grep"]), "small", "a")
    assert not_cacheable(spec(temperature=0.2)) == "temperature is not 0"
    assert not_cacheable(spec(depends_on=["t0"])) is not None
    assert not_cacheable(spec(model_preference="pinned", model="m")) is not None
    assert not_cacheable(base) is None
