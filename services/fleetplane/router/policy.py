"""Routing policy: which model a task attempt gets, and why (pure).

Decision order (docs/routing.md):
1. a model pinned by the manifest;
2. a tier: the one an escalation asks for, else the manifest's;
3. the task type's policy (catalog.yaml ``task_types``: tier and quality target), which the
   learned policy refines: the cheapest capable model whose estimated success for the task type
   meets the quality target, in any tier (in the asked-for tier only, under rule 2). Without such
   evidence the task type's tier (or the asked-for tier) decides.

A bounded, deterministic share of decisions explores: it judges models by a Thompson sample of
their Beta posterior instead of the conservative estimate. Every decision respects capabilities:
a task with tools needs a tool-use model, and the prompt must fit the context window.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from fleetplane.core.catalog import Catalog, Model
from fleetplane.core.events import TaskSpec
from fleetplane.router.stats import OutcomeStats

EXPECTED_OUTPUT_TOKENS = 500
CHARS_PER_TOKEN = 4
DEFAULT_QUALITY_TARGET = 0.8


@dataclass(frozen=True)
class PolicyConfig:
    exploration_share: float = 0.1  # at most this share of decisions explores
    confidence_z: float = 1.0  # conservative estimate = posterior mean - z * std
    min_cost_observations: int = 3  # below this, cost is estimated from the prompt length


@dataclass(frozen=True)
class BudgetView:
    """What the router knows of the team's budget when it decides."""

    low: bool = False
    note: str = ""


@dataclass(frozen=True)
class Decision:
    model: Model
    rule: str  # pinned | tier | escalated | task_type | learned | explore | default
    reason: str
    alternatives: list[str]
    estimated_cost_usd: float
    explored: bool = False


class Unroutable(Exception):
    """No model can take the task; `field` names the manifest field at fault."""

    def __init__(self, reason: str, field: str = "spec") -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


# -- capabilities and cost ---------------------------------------------------------------------
def prompt_tokens(spec: TaskSpec) -> int:
    """Before the call: ~4 characters per token of prompt and system prompt."""
    return max(1, (len(spec.prompt) + len(spec.system_prompt or "")) // CHARS_PER_TOKEN)


def incapable(model: Model, spec: TaskSpec) -> str | None:
    """Why `model` cannot take the task (None when it can). A task with a repository needs tool
    use even without tools of its own: the executor offers it the team's workspace tools, and a
    model without tool use could only answer without touching the repository."""
    if (spec.repository or spec.allowed_tools or spec.allowed_commands) and not model.tool_use:
        return "no tool use"
    need = prompt_tokens(spec) + EXPECTED_OUTPUT_TOKENS
    if need > model.context_window:
        return f"context window {model.context_window} < ~{need} tokens"
    return None


def token_estimate(model: Model, spec: TaskSpec, tokens: int | None = None) -> float:
    p = model.prices
    return (tokens or prompt_tokens(spec)) * p.input + EXPECTED_OUTPUT_TOKENS * p.output


def estimate_cost(model: Model, spec: TaskSpec, stats: OutcomeStats | None = None,
                  cfg: PolicyConfig | None = None, tokens: int | None = None) -> float:
    """Mean observed cost of an attempt of this task type on this model when there is enough
    evidence, else the prompt-length estimate at the model's prices."""
    cfg = cfg or PolicyConfig()
    if stats is not None:
        s = stats.get(spec.task_type, model.name)
        if s.attempts >= cfg.min_cost_observations and s.mean_cost_usd is not None:
            return s.mean_cost_usd
    return token_estimate(model, spec, tokens)


# -- determinism ---------------------------------------------------------------------------------
def _seed(key: str, tag: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}/{tag}".encode()).digest()[:8], "big")


def explores(key: str, share: float) -> bool:
    """Deterministic per decision key: the same task attempt always gets the same answer, and a
    `share` fraction of keys (uniformly hashed) explores."""
    return _seed(key, "explore") / 2**64 < share


# -- the decision --------------------------------------------------------------------------------
def quality_target(catalog: Catalog, task_type: str) -> float:
    policy = catalog.task_types.get(task_type)
    return policy.quality_target if policy else DEFAULT_QUALITY_TARGET


def _first_capable_tier(catalog: Catalog, tier: str, spec: TaskSpec) -> str | None:
    """`tier`, or the first tier above it with a capable model."""
    t: str | None = tier
    while t is not None:
        if any(m.tier == t and incapable(m, spec) is None for m in catalog.models.values()):
            return t
        t = catalog.tier_above(t)
    return None


def _fallback(catalog: Catalog, tier: str, refused: dict[str, str],
              costs: dict[str, float]) -> Model:
    default = catalog.default_model(tier)
    if default.name not in refused:
        return default
    return min((m for m in catalog.models.values() if m.tier == tier and m.name not in refused),
               key=lambda m: costs[m.name])


def choose(catalog: Catalog, spec: TaskSpec, stats: OutcomeStats, *, key: str,
           cfg: PolicyConfig | None = None, budget: BudgetView | None = None,
           escalate_to: str | None = None) -> Decision:
    """Pick the model for one attempt. `key` (task id and attempt) makes exploration and the
    Thompson draws deterministic. Raises Unroutable when no model can take the task."""
    cfg = cfg or PolicyConfig()
    budget = budget or BudgetView()
    models = list(catalog.models.values())
    refused = {m.name: why for m in models if (why := incapable(m, spec)) is not None}
    target = quality_target(catalog, spec.task_type)
    tokens = prompt_tokens(spec)
    costs = {m.name: estimate_cost(m, spec, stats, cfg, tokens) for m in models}

    if escalate_to is None and spec.model_preference == "pinned" and spec.model:
        if spec.model not in catalog.models:
            raise Unroutable(f"model {spec.model!r} is not in the catalog", "spec.model")
        model = catalog.models[spec.model]
        if model.name in refused:
            raise Unroutable(f"pinned model {model.name} cannot take this task: "
                             f"{refused[model.name]}", "spec.model")
        return Decision(model, "pinned", f"pinned by the manifest to {model.name}",
                        _alternatives(models, model, refused, spec, stats, costs, target),
                        costs[model.name])

    asked = escalate_to or spec.tier
    if asked is not None:
        if asked not in catalog.tiers:
            raise Unroutable(f"tier {asked!r} is not in the catalog ({catalog.tiers})", "spec.tier")
        tier = _first_capable_tier(catalog, asked, spec)
        if tier is None:
            raise Unroutable(_nothing_fits(refused), "spec")
        pool = [m for m in models if m.tier == tier and m.name not in refused]
        rule = "escalated" if escalate_to else "tier"
        why = (f"escalated to tier {tier}" if escalate_to
               else f"tier {tier} requested by the manifest")
        if tier != asked:
            why += f" (no capable model in tier {asked})"
    else:
        if spec.task_type in catalog.task_types:
            base_tier = catalog.task_types[spec.task_type].tier
            why = f"task type {spec.task_type} maps to tier {base_tier}"
            rule = "task_type"
        else:
            base_tier = catalog.default_tier
            why = f"task type {spec.task_type} has no policy; default tier {base_tier}"
            rule = "default"
        found = _first_capable_tier(catalog, base_tier, spec)
        if found is None:
            raise Unroutable(_nothing_fits(refused), "spec")
        if found != base_tier:
            why += f" (no capable model there; tier {found})"
        tier = found
        pool = [m for m in models if m.name not in refused]

    fallback = _fallback(catalog, tier, refused, costs)
    explored = not budget.low and explores(key, cfg.exploration_share)
    z = 0.0 if budget.low else cfg.confidence_z
    rng = random.Random(_seed(key, "thompson"))
    scored: list[tuple[float, float, Model]] = []  # (estimated success, cost, model)
    for m in sorted(pool, key=lambda m: m.name):  # fixed draw order: deterministic
        s = stats.get(spec.task_type, m.name)
        est = s.sample(rng) if explored else s.lower(z)
        scored.append((est, costs[m.name], m))
    qualifying = sorted((c, m.name, e, m) for e, c, m in scored if e >= target)
    if qualifying:
        cost, _, est, model = qualifying[0]
        s = stats.get(spec.task_type, model.name)
        if explored:
            rule, reason = "explore", (
                f"exploring: {model.name} is the cheapest model whose Thompson sample "
                f"{est:.2f} meets {spec.task_type}'s quality target {target:.2f} "
                f"({s.successes}/{s.attempts} successes so far); {why}")
        else:
            judged = "posterior mean" if budget.low else "conservative estimate"
            if rule in ("task_type", "default"):
                rule = "learned"
            reason = (f"learned: {model.name} is the cheapest model whose {judged} of success "
                      f"{est:.2f} ({s.successes}/{s.attempts}) meets {spec.task_type}'s "
                      f"quality target {target:.2f}; {why}")
    else:
        model, cost = fallback, costs[fallback.name]
        reason = (f"{why}; no model has the evidence to meet {spec.task_type}'s quality target "
                  f"{target:.2f} yet, so the tier's default {model.name}")
        if explored:
            reason += " (exploring: no Thompson sample met the target)"
    if budget.low and budget.note:
        reason += f"; {budget.note}"
    return Decision(model, rule, reason,
                    _alternatives(models, model, refused, spec, stats, costs, target), cost,
                    explored=explored)


def _nothing_fits(refused: dict[str, str]) -> str:
    detail = "; ".join(f"{n}: {why}" for n, why in sorted(refused.items()))
    return f"no model in the catalog can take this task ({detail})"


def _alternatives(models: list[Model], chosen: Model, refused: dict[str, str], spec: TaskSpec,
                  stats: OutcomeStats, costs: dict[str, float], target: float) -> list[str]:
    """Every other model with why it was not chosen: capability, or estimate and cost."""
    out = []
    for m in sorted(models, key=lambda m: (costs[m.name], m.name)):
        if m.name == chosen.name:
            continue
        if m.name in refused:
            out.append(f"{m.name} ({m.tier}): {refused[m.name]}")
            continue
        s = stats.get(spec.task_type, m.name)
        out.append(f"{m.name} ({m.tier}): success {s.mean:.2f} over {s.attempts} attempts "
                   f"(target {target:.2f}), est. ${costs[m.name]:.6f}")
    return out
