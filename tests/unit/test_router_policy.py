"""The pure routing policy: exploration bounds, Thompson sampling, posteriors, cache keys."""

from __future__ import annotations

from typing import Any

import pytest

from fleetplane.core.catalog import catalog_for
from fleetplane.core.events import TaskSpec
from fleetplane.core.settings import Settings
from fleetplane.router.cache import cache_key, not_cacheable
from fleetplane.router.policy import explores
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


def test_posterior_estimates() -> None:
    s = ModelStats()
    for _ in range(10):
        s.record(True, 0.0)
    assert s.mean == pytest.approx(11 / 12)
    assert s.lower(1.0) < s.mean and s.lower(0.0) == s.mean
    assert ModelStats().mean == 0.5 and ModelStats().mean_cost_usd is None
    # the posterior weighs about the last WINDOW outcomes: a model that turns bad is re-judged
    for _ in range(2000):
        s.record(True, 0.0)
    for _ in range(500):
        s.record(False, 0.0)
    assert s.mean < 0.5 and (s.successes, s.failures) == (2010, 500)  # totals stay exact


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
