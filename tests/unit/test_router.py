"""The router's handler, pure: decision order, capabilities, escalation, budget, cache."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from fleetplane.core import events as ev
from fleetplane.core.catalog import Usage, catalog_for
from fleetplane.core.settings import Settings
from fleetplane.core.teams import parse_teams
from fleetplane.router.handlers import Router
from fleetplane.router.policy import PolicyConfig
from fleetplane.router.state import RouterState

NO_EXPLORE = PolicyConfig(exploration_share=0.0)


def catalog():  # type: ignore[no-untyped-def]
    return catalog_for(Settings().catalog_file)


def router(cfg: PolicyConfig = NO_EXPLORE, ttl_s: float = 3600.0) -> Router:
    teams = parse_teams({"defaults": {"low_budget_share": 0.2}})
    return Router(catalog(), teams, RouterState(catalog(), ttl_s), cfg)


def spec(**fields: Any) -> ev.TaskSpec:
    base: dict[str, Any] = {"name": "n", "task_type": "summarize", "prompt": "x" * 400}
    base.update(fields)
    return ev.TaskSpec(**base)


def accepted(task_id: str = "t1", team: str = "a", **fields: Any) -> ev.TaskAccepted:
    return ev.TaskAccepted(task_id=task_id, team=team, spec=spec(**fields))


def one(r: Router, event: ev.Event) -> Any:
    (out,) = r.handle(event)
    return out


def routed(event: ev.TaskAccepted, r: Router | None = None) -> ev.TaskRouted:
    out = one(r or router(), event)
    assert isinstance(out, ev.TaskRouted), out
    return out


def complete(r: Router, task_id: str, attempt: int = 1, cost: float = 0.001,
             output: str = "answer", team: str = "a") -> None:
    rec = r.state.tasks.get(task_id)
    model = (rec.model_of(attempt) if rec else None) or "unknown"
    r.handle(ev.TaskCompleted(task_id=task_id, team=team, attempt=attempt, model=model,
                              output=output, cost_usd=cost, duration_ms=5))


def train(r: Router, task_type: str, model: str, successes: int, failures: int = 0,
          cost: float = 0.0001, prefix: str = "train") -> None:
    """Route pinned tasks to `model` and report their outcomes, as the pipeline would."""
    for i in range(successes + failures):
        tid = f"{prefix}-{task_type}-{model}-{i}"
        out = one(r, accepted(tid, task_type=task_type, model_preference="pinned", model=model,
                              labels={"fleetplane/cache": "off"}))
        assert out.model == model
        if i < successes:
            r.handle(ev.TaskCompleted(task_id=tid, team="a", attempt=1, model=model,
                                      output="ok", cost_usd=cost, duration_ms=1))
        else:
            r.handle(ev.TaskFailed(task_id=tid, team="a", attempt=1, failure_class="model_error",
                                   reason="bad", cost_usd=cost, final=False))


# -- decision order --------------------------------------------------------------------------
def test_task_type_picks_its_tier_without_evidence() -> None:
    assert routed(accepted(task_type="summarize")).tier == "small"
    assert routed(accepted(task_type="architecture")).tier == "frontier"
    r = routed(accepted(task_type="refactor"))
    assert r.tier == "standard" and "maps to tier standard" in r.reason
    assert "no model has 5 outcomes of refactor yet" in r.reason


def test_manifest_tier_beats_task_type_and_pinned_beats_all() -> None:
    r = routed(accepted(task_type="summarize", tier="frontier", model_preference="tier"))
    assert (r.tier, r.model) == ("frontier", "claude-opus-4-7")
    assert "requested by the manifest" in r.reason
    r = routed(accepted(task_type="architecture", model_preference="pinned",
                        model="gpt-4o-mini"))
    assert (r.model, r.provider) == ("gpt-4o-mini", "openai")
    assert "pinned" in r.reason


def test_pinned_beats_learned_and_tier_keeps_learning_inside_the_tier() -> None:
    rt = router()
    train(rt, "codegen", "fleet-local-coder", 30)
    assert routed(accepted("p", task_type="codegen", model_preference="pinned",
                           model="claude-opus-4-7"), rt).model == "claude-opus-4-7"
    r = routed(accepted("q", task_type="codegen", tier="standard", model_preference="tier"), rt)
    assert r.model == "claude-sonnet-4-6"  # the learned small model is not in the asked tier
    assert routed(accepted("s", task_type="codegen"), rt).model == "fleet-local-coder"


def test_unknown_task_type_gets_the_default_tier_and_says_so() -> None:
    r = routed(accepted(task_type="haiku-writing"))
    assert r.tier == "standard" and "no policy" in r.reason


def test_decision_carries_alternatives_estimate_and_causation() -> None:
    event = accepted()
    r = routed(event)
    assert r.causation_id == event.event_id and r.task_id == "t1" and r.attempt == 1
    names = [a.split(" ")[0] for a in r.alternatives]
    assert r.model not in names and len(names) == len(catalog().models) - 1
    assert all("success" in a or "tool use" in a or "context" in a for a in r.alternatives)
    small = catalog().model(r.model)
    # 400 chars ~ 100 input tokens + 500 expected output tokens, at the catalog's prices
    assert r.estimated_cost_usd == small.cost(Usage(input_tokens=100, output_tokens=500))


def test_same_input_twice_gives_the_same_event_id_and_decision() -> None:
    rt = router(PolicyConfig(exploration_share=0.5))
    event = accepted("det")
    a, b = one(rt, event), one(rt, event)
    assert (a.event_id, a.model, a.reason) == (b.event_id, b.model, b.reason)


def test_unknown_pinned_model_is_rejected_not_crashed() -> None:
    out = one(router(), accepted(model_preference="pinned", model="no-such-model"))
    assert isinstance(out, ev.TaskRejected) and out.field == "spec.model"


# -- capabilities ----------------------------------------------------------------------------
def test_tools_need_a_tool_use_model() -> None:
    rt = router()
    train(rt, "summarize", "fleet-local-coder", 40)
    assert routed(accepted("a1"), rt).model == "fleet-local-coder"
    r = routed(accepted("a2", allowed_tools=["read_file"]), rt)
    assert r.model != "fleet-local-coder"
    assert any(a.startswith("fleet-local-coder") and "no tool use" in a for a in r.alternatives)
    out = one(rt, accepted("a3", allowed_tools=["grep"], model_preference="pinned",
                           model="fleet-local-coder"))
    assert isinstance(out, ev.TaskRejected) and "no tool use" in out.reason


def test_a_task_on_a_repository_needs_a_tool_use_model_without_tools_of_its_own() -> None:
    """Found by the chaos run: the executor offers the team's workspace tools to every task with
    a repository, so a model without tool use would answer without touching the repository."""
    rt = router()
    train(rt, "summarize", "fleet-local-coder", 40)
    r = routed(accepted("w1", repository="payments-core", write_scope=["src/**"]), rt)
    assert r.model != "fleet-local-coder"
    assert any(a.startswith("fleet-local-coder") and "no tool use" in a for a in r.alternatives)


def test_context_window_is_respected() -> None:
    big = "y" * (40_000 * 4)  # ~40k tokens: over fleet-local-coder's 32k window
    rt = router()
    train(rt, "summarize", "fleet-local-coder", 40)
    r = routed(accepted("big", prompt=big), rt)
    assert r.model != "fleet-local-coder"
    assert any("context window 32768" in a for a in r.alternatives)
    huge = "z" * (2_000_000 * 4)
    out = one(rt, accepted("huge", prompt=huge))
    assert isinstance(out, ev.TaskRejected) and "context window" in out.reason


# -- learned policy --------------------------------------------------------------------------
def test_learned_picks_the_cheapest_model_meeting_the_target() -> None:
    rt = router()
    train(rt, "codegen", "gpt-4o-mini", 30)
    r = routed(accepted("c1", task_type="codegen"), rt)
    assert (r.model, r.tier) == ("gpt-4o-mini", "small")
    assert r.reason.startswith("objective:") and "q 0.95 (default)" in r.reason
    # the default (price) scope names the pick's value at the price of a success
    assert "gpt-4o-mini has the largest value" in r.reason
    # a cheaper model that fails often gets at most the share the target allows: the mixture's
    # expected success stays at q x the best (here 1/3 success against 31/32)
    train(rt, "codegen", "fleet-local-coder", 10, failures=20, cost=0.00001)
    picks = [routed(accepted(f"c2-{i}", task_type="codegen"), rt).model for i in range(300)]
    coder = picks.count("fleet-local-coder") / len(picks)
    assert coder < 0.1
    assert coder * (11 / 32) + (1 - coder) * (31 / 32) >= 0.95 * (31 / 32) - 0.02
    # q = 1 (the manifest asks for the best model's success): the weak model never
    picks = [routed(accepted(f"c3-{i}", task_type="codegen",
                             labels={"fleetplane/quality-share": "1"}), rt) for i in range(100)]
    assert {p.model for p in picks} == {"gpt-4o-mini"}
    assert "q 1.00 (manifest)" in picks[0].reason


def test_learned_needs_evidence_not_luck() -> None:
    rt = router()
    train(rt, "codegen", "gpt-4o-mini", 2)  # 2/2: mean 0.75, far from confident
    assert routed(accepted("c3", task_type="codegen"), rt).model == "claude-sonnet-4-6"


def test_learned_goes_up_a_tier_when_the_cheap_one_fails() -> None:
    rt = router()
    train(rt, "summarize", "claude-haiku-4-5", 5, failures=25)
    train(rt, "summarize", "claude-sonnet-4-6", 30)
    assert routed(accepted("u", task_type="summarize"), rt).model == "claude-sonnet-4-6"


def test_mean_cost_comes_from_outcomes() -> None:
    rt = router()
    train(rt, "codegen", "gpt-4o-mini", 30, cost=0.02)
    r = routed(accepted("mc", task_type="codegen"), rt)
    assert r.estimated_cost_usd == pytest.approx(0.02)


def test_neutral_failures_and_repeated_outcomes_are_not_counted() -> None:
    rt = router()
    one(rt, accepted("n1", task_type="codegen"))
    fail = ev.TaskFailed(task_id="n1", team="a", attempt=1, failure_class="lost_executor",
                         reason="gone", final=False)
    rt.handle(fail)
    assert rt.state.stats.get("codegen", "claude-sonnet-4-6").attempts == 0
    one(rt, accepted("n2", task_type="codegen"))
    for _ in range(3):
        complete(rt, "n2")
    assert rt.state.stats.get("codegen", "claude-sonnet-4-6").successes == 1


def test_a_retried_attempt_counts_against_the_model_it_ran_on() -> None:
    rt = router()
    one(rt, accepted("rt", task_type="codegen"))
    rt.handle(ev.TaskFailed(task_id="rt", team="a", attempt=1, failure_class="model_error",
                            reason="x", final=False))
    complete(rt, "rt", attempt=2)  # the coordinator retried on the same routing
    s = rt.state.stats.get("codegen", "claude-sonnet-4-6")
    assert (s.successes, s.failures) == (1, 1)


# -- escalation ------------------------------------------------------------------------------
def test_escalation_routes_the_next_attempt_one_tier_up() -> None:
    rt = router()
    first = routed(accepted("e1", task_type="codegen"), rt)
    assert first.tier == "standard"
    rt.handle(ev.TaskFailed(task_id="e1", team="a", attempt=1, failure_class="timeout",
                            reason="slow", final=False))
    esc = ev.TaskEscalated(task_id="e1", team="a", attempt=2, from_tier="standard",
                           to_tier="frontier", reason="timeout policy escalate",
                           spec=first.spec)
    out = one(rt, esc)
    assert isinstance(out, ev.TaskRouted)
    assert (out.attempt, out.tier, out.model) == (2, "frontier", "claude-opus-4-7")
    assert out.reason.startswith("escalated from standard to frontier: timeout policy escalate")
    assert out.causation_id == esc.event_id
    # the first attempt's failure counted against the standard model, not the frontier one
    assert rt.state.stats.get("codegen", "claude-sonnet-4-6").failures == 1
    complete(rt, "e1", attempt=2)
    assert rt.state.stats.get("codegen", "claude-opus-4-7").successes == 1


def test_escalation_without_spec_uses_the_routed_spec_and_top_tier_fails_clearly() -> None:
    rt = router()
    routed(accepted("e2", task_type="codegen"), rt)
    out = one(rt, ev.TaskEscalated(task_id="e2", team="a", attempt=2, from_tier="standard",
                                   to_tier="frontier", reason="r"))
    assert isinstance(out, ev.TaskRouted) and out.spec.task_type == "codegen"
    out = one(rt, ev.TaskEscalated(task_id="e2", team="a", attempt=3, from_tier="frontier",
                                   to_tier="galactic", reason="r"))
    assert isinstance(out, ev.TaskFailed) and out.final and "galactic" in out.reason


def test_escalation_is_never_answered_from_the_cache() -> None:
    rt = router()
    first = routed(accepted("e3", task_type="summarize"), rt)
    complete(rt, "e3")
    rt.handle(ev.TaskEscalated(task_id="seed", team="a", attempt=1, from_tier="small",
                               to_tier="small", reason="r", spec=first.spec))
    out = one(rt, ev.TaskEscalated(task_id="e4", team="a", attempt=2, from_tier="small",
                                   to_tier="standard", reason="r", spec=first.spec))
    assert isinstance(out, ev.TaskRouted) and out.tier == "standard"


# -- budget ----------------------------------------------------------------------------------
def budget(team: str, remaining: float, total: float = 100.0) -> ev.BudgetStatus:
    return ev.BudgetStatus(task_id="", team=team, period="day", budget_usd=total,
                           spent_usd=total - remaining, remaining_usd=remaining,
                           state="ok" if remaining > 0 else "exhausted")


def _share(rt: Router, model: str, prefix: str, n: int = 300, team: str = "a") -> float:
    picks = [routed(accepted(f"{prefix}-{i}", team=team, task_type="codegen"), rt).model
             for i in range(n)]
    return picks.count(model) / n


def test_low_budget_prefers_a_cheaper_model_the_target_allows() -> None:
    rt = router()
    train(rt, "codegen", "gpt-4o-mini", 17, failures=3)  # mean 0.82
    train(rt, "codegen", "claude-sonnet-4-6", 40, cost=0.003)  # mean 0.98
    normal = _share(rt, "gpt-4o-mini", "n")
    rt.handle(budget("a", remaining=10.0))  # 10% left < 20%
    low = _share(rt, "gpt-4o-mini", "l")
    assert low > normal + 0.1  # q capped at 0.90 instead of 0.95: more of the cheaper model
    r = routed(accepted("b2", task_type="codegen"), rt)
    assert "budget low" in r.reason and "q capped at 0.90" in r.reason
    assert "q 0.90" in r.reason
    # another team with budget is unaffected
    assert abs(_share(rt, "gpt-4o-mini", "o", team="b") - normal) < 0.08


def test_low_budget_does_not_downgrade_below_the_quality_target() -> None:
    rt = router()
    train(rt, "codegen", "gpt-4o-mini", 5, failures=5)  # mean 0.5
    train(rt, "codegen", "claude-sonnet-4-6", 40, cost=0.003)
    rt.handle(budget("a", remaining=1.0))
    mini = _share(rt, "gpt-4o-mini", "d")
    # expected success of the picks stays at q (0.90 while low) x the best
    assert mini * 0.5 + (1 - mini) * (41 / 42) >= 0.9 * (41 / 42) - 0.03


def test_spent_budget_holds_the_task_and_budget_again_releases_it() -> None:
    rt = router()
    rt.handle(budget("a", remaining=0.0))
    held = one(rt, accepted("h1", task_type="codegen"))
    assert isinstance(held, ev.TaskHeld) and held.kind == "budget" and held.attempt == 1
    assert "spent" in held.reason and "held until" in held.reason
    one(rt, accepted("h2", task_type="review"))
    assert rt.handle(budget("a", remaining=0.0)) == []  # still spent: nothing moves
    other = routed(accepted("h3", team="b", task_type="codegen"), rt)  # other team flows
    assert other.tier == "standard"
    status = budget("a", remaining=50.0)
    outs = rt.handle(status)
    assert [(o.task_id, type(o).__name__) for o in outs] == [("h1", "TaskRouted"),
                                                             ("h2", "TaskRouted")]
    assert all("released from the budget hold" in o.reason for o in outs)
    assert all(o.causation_id == status.event_id for o in outs)
    assert rt.handle(budget("a", remaining=40.0)) == []  # released once


def test_spent_budget_holds_an_escalation_and_releases_it_in_its_tier() -> None:
    rt = router()
    first = routed(accepted("h4", task_type="codegen"), rt)
    rt.handle(budget("a", remaining=0.0))
    held = one(rt, ev.TaskEscalated(task_id="h4", team="a", attempt=2, from_tier="standard",
                                    to_tier="frontier", reason="r", spec=first.spec))
    assert isinstance(held, ev.TaskHeld) and held.attempt == 2
    (out,) = rt.handle(budget("a", remaining=20.0))
    assert isinstance(out, ev.TaskRouted) and (out.attempt, out.tier) == (2, "frontier")


def test_a_cancelled_held_task_is_not_released() -> None:
    rt = router()
    rt.handle(budget("a", remaining=0.0))
    one(rt, accepted("h5"))
    rt.handle(ev.TaskCancelled(task_id="h5", team="a", reason="no longer needed"))
    assert rt.handle(budget("a", remaining=50.0)) == []


# -- response cache --------------------------------------------------------------------------
def test_a_repeated_prompt_is_completed_from_the_cache_at_zero_cost() -> None:
    rt = router()
    first = routed(accepted("c1", prompt="Translate the help page into French."), rt)
    complete(rt, "c1", output="Bonjour", cost=0.003)
    hit = one(rt, accepted("c2", prompt="Translate the help page into French."))
    assert isinstance(hit, ev.TaskCompleted)
    assert (hit.cached, hit.cost_usd, hit.model, hit.output) == (True, 0.0, "cache", "Bonjour")
    assert rt.cache_hits == 1 and rt.cache_saved_usd == first.estimated_cost_usd
    # the cached completion is not a success of any model
    assert rt.state.stats.get("summarize", "cache").attempts == 0


def test_cache_misses_on_any_part_of_the_key() -> None:
    rt = router()
    p = "Translate the help page into French."
    routed(accepted("k0", prompt=p), rt)
    complete(rt, "k0")
    misses = {
        "other tool set": accepted("k1", prompt=p, allowed_tools=["read_file"]),
        "other commands": accepted("k2", prompt=p, allowed_commands=["ls"]),
        "other system prompt": accepted("k3", prompt=p, system_prompt="be terse"),
        "near-miss prompt": accepted("k4", prompt=p.replace("French", "German")),
        "temperature": accepted("k5", prompt=p, temperature=0.7),
        "other team": accepted("k6", team="b", prompt=p),
        "workspace task": accepted("k7", prompt=p, repository="r", write_scope=["a/**"]),
        "opted out": accepted("k8", prompt=p, labels={"fleetplane/cache": "off"}),
        "other tier": accepted("k9", prompt=p, tier="standard", model_preference="tier"),
    }
    for why, event in misses.items():
        assert isinstance(one(rt, event), ev.TaskRouted), why
    # a frontier answer serves a small-tier request (never the reverse: k9 above missed)
    routed(accepted("k10", prompt="Explain CAP.", tier="frontier", model_preference="tier"), rt)
    complete(rt, "k10", output="CAP...")
    assert isinstance(one(rt, accepted("k11", prompt="Explain CAP.")), ev.TaskCompleted)


def test_cache_entries_expire_after_the_ttl() -> None:
    rt = router(ttl_s=60)
    routed(accepted("x0", prompt="p"), rt)
    complete(rt, "x0")
    late = accepted("x1", prompt="p")
    late = late.model_copy(update={"occurred_at": late.occurred_at + timedelta(seconds=120)})
    assert isinstance(one(rt, late), ev.TaskRouted)


def test_cached_completions_do_not_fill_the_cache_and_failed_answers_never_do() -> None:
    rt = router()
    routed(accepted("f0", prompt="q"), rt)
    rt.handle(ev.TaskFailed(task_id="f0", team="a", attempt=1, failure_class="model_error",
                            reason="x", final=True))
    assert isinstance(one(rt, accepted("f1", prompt="q")), ev.TaskRouted)
    assert len(rt.state.cache) == 0
