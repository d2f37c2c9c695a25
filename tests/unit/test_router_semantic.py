"""The guarded semantic cache through the router's handler: near-duplicates of a team's prompt
are answered from the cache, never across teams, tool sets or task types, never for a prompt
that differs in a number or a name, never for a task type that did not opt in."""

from __future__ import annotations

from typing import Any

import pytest

from fleetplane.core import events as ev
from fleetplane.core.catalog import catalog_for
from fleetplane.core.settings import Settings
from fleetplane.core.teams import parse_teams
from fleetplane.router.features import FeatureCache, load_embedder
from fleetplane.router.handlers import Router
from fleetplane.router.policy import PolicyConfig
from fleetplane.router.semantic import SemanticCache, edits, salient, wording
from fleetplane.router.semantic_eval import BENIGN, NEAR_MISS, semantic_pairs
from fleetplane.router.state import RouterState

BASE = "Summarize the incident report about the payment outage in two sentences."


@pytest.fixture(scope="module")
def features() -> FeatureCache:
    return FeatureCache(load_embedder("wordllama"))


def router(features: FeatureCache, types: tuple[str, ...] = ("summarize",)) -> Router:
    cat = catalog_for(Settings().catalog_file)
    state = RouterState(cat, 3600.0, "team", semantic=SemanticCache(types, 0.97),
                        semantic_features=features)
    return Router(cat, parse_teams({"defaults": {"low_budget_share": 0.2}}), state,
                  PolicyConfig(exploration_share=0.0))


def submit(r: Router, tid: str, prompt: str, team: str = "a", task_type: str = "summarize",
           **spec: Any) -> ev.Event:
    (out,) = r.handle(ev.TaskAccepted(task_id=tid, team=team, spec=ev.TaskSpec(
        name="n", task_type=task_type, prompt=prompt, **spec)))
    return out


def answered(r: Router, tid: str, prompt: str, **kw: Any) -> ev.Event:
    """Submit; when routed, complete it (filling the caches) and return the routing."""
    out = submit(r, tid, prompt, **kw)
    if isinstance(out, ev.TaskRouted):
        r.handle(ev.TaskCompleted(task_id=tid, team=kw.get("team", "a"), attempt=1,
                                  model=out.model, output=f"answer to {tid}", cost_usd=0.003,
                                  duration_ms=1))
    return out


def test_a_near_duplicate_of_the_same_scope_is_answered(features: FeatureCache) -> None:
    r = router(features)
    assert isinstance(answered(r, "t1", BASE), ev.TaskRouted)
    for i, variant in enumerate([
            "Summarize the incident report about the payment outage in two sentences, please.",
            "  summarize the incident report about the payment outage in two sentences  ",
            "Please summarize the incident report about the payment outage in two sentences!"]):
        out = submit(r, f"v{i}", variant)
        assert isinstance(out, ev.TaskCompleted) and out.cached, (variant, out)
        assert out.output == "answer to t1"
    assert r.semantic_hits == 3


@pytest.mark.parametrize("kw", [
    {"team": "b"},  # another team
    {"allowed_tools": ["read_file"]},  # another tool set
    {"task_type": "classify"},  # another task type of the same tier, opted in too
    {"system_prompt": "Answer in French."},  # another system prompt
], ids=["team", "tools", "task-type", "system-prompt"])
def test_it_never_answers_across_teams_tool_sets_or_task_types(features: FeatureCache,
                                                               kw: dict[str, Any]) -> None:
    r = router(features, ("summarize", "classify"))
    answered(r, "t1", BASE)
    out = submit(r, "x1", BASE + " please", **kw)
    assert isinstance(out, ev.TaskRouted), out
    assert r.semantic_hits == 0


@pytest.mark.parametrize("prompt", [
    "Summarize the incident report about the payment outage in three sentences.",
    "Summarize the incident report about the payment outage in 2 sentences.",
    "Summarize the incident report about the Stripe payment outage in two sentences.",
    "Summarize the incident report about the login outage in two sentences.",
    "Summarize the report about the incident in the payment outage in two sentences.",
])
def test_a_near_miss_is_not_answered(features: FeatureCache, prompt: str) -> None:
    r = router(features)
    answered(r, "t1", BASE)
    assert isinstance(submit(r, "m1", prompt), ev.TaskRouted)


def test_names_and_numbers_guard_even_when_the_embeddings_agree(
        features: FeatureCache) -> None:
    r = router(features)
    answered(r, "t1", "Refund order 1234 for Alice Martin.")
    for near in ("Refund order 1243 for Alice Martin.", "Refund order 1234 for Alice Marten.",
                 "Refund order 1234 for Bob Martin."):
        assert isinstance(submit(r, f"n-{near}", near), ev.TaskRouted), near


def test_a_task_type_that_did_not_opt_in_gets_exact_hits_only(features: FeatureCache) -> None:
    r = router(features, types=())
    answered(r, "t1", BASE)
    assert isinstance(submit(r, "v1", BASE + " please"), ev.TaskRouted)
    exact = submit(r, "v2", BASE)
    assert isinstance(exact, ev.TaskCompleted) and exact.cached
    assert r.semantic_hits == 0


def test_guards() -> None:
    assert salient("Pay Alice 12.50 for 'order 7'") == salient("pay Alice 12.50 for 'order 7'")
    assert salient("Pay Alice") != salient("Pay Alicia") and salient("use the API") != salient(
        "use the api")
    assert salient("order 12") != salient("order 21")
    assert wording("Please, summarize THIS!") == ("summarize", "this")
    assert edits(("a", "b", "c"), ("a", "x", "c"), 1) == 1
    assert edits(("a", "b", "c"), ("x", "y", "c"), 1) == 2
    assert edits(("a",), ("a",), 0) == 0


def test_the_eval_measures_false_hits_on_near_misses_and_hits_on_variants(
        features: FeatureCache) -> None:
    prompts = [("summarize", f"Summarize the report of team {name} about incident {n} in "
                             f"the {word} service.")
               for n, (name, word) in enumerate([("Alpha", "billing"), ("Bravo", "search"),
                                                 ("Charlie", "ledger"), ("Delta", "mailer")]
                                                * 5)]
    kinds = {k.kind: k for k in semantic_pairs(prompts, features, per_kind=10)}
    assert all(kinds[k].pairs == 10 for k in ("number", "name", "word", "spacing"))
    assert sum(kinds[k].hits for k in NEAR_MISS) == 0
    assert all(kinds[k].hits == kinds[k].pairs > 0 for k in BENIGN)
    # with one word edit allowed, numbers and names are still guarded on their own
    loose = {k.kind: k for k in semantic_pairs(prompts, features, per_kind=10, max_edits=1)}
    assert loose["number"].hits == loose["name"].hits == 0
