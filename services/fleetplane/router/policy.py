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
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from fleetplane.core.catalog import Catalog, Model
from fleetplane.core.events import TaskSpec
from fleetplane.router.features import Vector
from fleetplane.router.objective import DEFAULT_QUALITY_SHARE, Mixture, Option, solve
from fleetplane.router.pooled import TypeTarget, pooled_targets
from fleetplane.router.price import REFERENCE_SHARE, success_price
from fleetplane.router.signal import PromptSignal, RecentPredictions
from fleetplane.router.stats import RECENT, OutcomeStats

EXPECTED_OUTPUT_TOKENS = 500
CHARS_PER_TOKEN = 4
QUALITY_LABEL = "fleetplane/quality-share"
BORROW = 0.2  # weight of one outcome of another task type in a type's prior
QUALITY_SCOPES = ("type", "pooled", "price")  # where q x best is kept (PolicyConfig.quality_scope)
POOLED_EVERY = 20  # outcomes between two solutions of the pooled program
RECENT_PROMPTS = 200  # a task type's recent prompts whose predictions rank a new one
BORROW_CAP = 5.0  # at most this many pseudo-outcomes borrowed from other task types


@dataclass(frozen=True)
class PolicyConfig:
    exploration_share: float = 1.0  # share of decisions judged by Thompson samples
    min_cost_observations: int = 3  # below this, cost is estimated from the prompt length
    low_budget_quality_share: float = 0.9  # q is at most this while the team's budget is low
    confidence_z: float = 0.0  # options other than the best are judged this many std lower
    shortfall_gain: float = 3.0  # the target rises by this times the type's realised shortfall
    best_from_samples: bool = True  # exploring: the best model is judged by its sample too
    shortfall_recent: bool = True  # shortfall of the recent success rate (EMA), not all-time
    min_evidence: float = 5.0  # outcomes before a model is judged without exploring
    signal_min_outcomes: int = 30  # a model's outcomes before its per-prompt prediction counts
    signal_weight: float = 0.5  # weight of the per-prompt prediction against the type's mean
    sampled_per_decision: int = 3  # exploring: models judged by their sample (0: all)
    # ... in the price scope: with 11 models (development set), 2 drawn models lose fewer
    # successes to lucky draws of mediocre ones (docs/routing.md, eighth round)
    price_sampled_per_decision: int = 2
    play_contender: bool = True  # a sampled model whose draw beats the leader is tried
    # a contender is tried only when its draw would make the leader miss the target
    contender_must_matter: bool = False
    # a contender is tried only when its draw would make the leader's own draw miss the
    # target (Thompson sampling on the constraint, not on which model is best)
    contender_vs_draw: bool = False
    sample_by_spread: bool = False  # exploring: the drawn models are picked by posterior spread
    prior_strength: float = 4.0  # pseudo-outcomes of the two-way prior (0: the pooled borrow)
    # the two-way prior's strength estimated from the table (empirical Bayes, prior.py), once
    # there are enough pairs; `prior_strength` until then
    prior_strength_eb: bool = False
    ledger: bool = True  # the target repays the type's success ledger (docs/routing.md)
    repay_horizon: float = 100.0  # ledger: decisions over which a deficit (or surplus) is repaid
    ledger_spend: bool = False  # ledger: a surplus lowers the target (else only deficits count)
    ledger_band: float = 0.0  # ledger: deficits within this many standard errors are ignored
    # "type": q x best is kept per task type; "pooled": over all task types together, each
    # type at least `pooled_floor` x its best (fleetplane.router.pooled)
    quality_scope: str = "price"
    # a mixture's dear model gets the prompts whose predicted gain over the cheap one ranks in
    # the top `upper_share` of the type's recent prompts (else: a uniform draw)
    prompt_rank: bool = True
    prompt_rank_min: int = 20  # recent prompts of the type before their ranks are used
    pooled_floor: float = 0.85
    # exploration ends for a task type once its decision is settled: the cheapest model that
    # clearly meets q x every model's success (by `settle_z` standard errors of the
    # difference), every cheaper one clearly below q x the best (0: never settled)
    settle_z: float = 0.0
    # the price scope judges a model by its per-prompt prediction only where the prompt model
    # has predicted that model's outcomes on the task type (or, on a type it has not run, on
    # all types) this much better than the type's success rate (a Brier skill score)
    price_prompt_skill: float = 0.2


@dataclass(frozen=True)
class PromptView:
    """Per-prompt success predictions by model (fleetplane.router.signal), and the predictions
    of the task type's recent prompts (the caller keeps them, most recent last): with them, a
    mixture of two models sends the dear one the prompts where it is predicted to gain most."""

    predictions: dict[str, float]
    recent: RecentPredictions | None = None  # the type's recent prompts, this one included
    # by model, the prompt model's measured skill on the task type (PromptSignal.skill; None:
    # too few outcomes); without it (None) every prediction is taken at its word
    skill: dict[str, float | None] | None = None


def prompt_view(signal: PromptSignal, models: Iterable[str], task_type: str, x: Vector,
                recent: RecentPredictions) -> PromptView:
    """The prompt's predictions and the prompt model's skill by model, ranked among the task
    type's `recent` prompts (this one is added to them): what `choose` takes as `prompt`."""
    names = sorted(models)
    view = PromptView(signal.predict_many(names, task_type, x), recent,
                      {m: signal.skill(m, task_type) for m in names})
    recent.add(view.predictions)
    return view


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
        o = stats.overall(model.name)
        if o.attempts >= cfg.min_cost_observations and o.mean_cost_usd is not None:
            return o.mean_cost_usd
    return token_estimate(model, spec, tokens)


# -- determinism ---------------------------------------------------------------------------------
def _seed(key: str, tag: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}/{tag}".encode()).digest()[:8], "big")


def explores(key: str, share: float) -> bool:
    """Deterministic per decision key: the same task attempt always gets the same answer, and a
    `share` fraction of keys (uniformly hashed) explores."""
    return _seed(key, "explore") / 2**64 < share


# -- the decision --------------------------------------------------------------------------------
def quality_share(catalog: Catalog, spec: TaskSpec, team_shares: dict[str, float] | None = None,
                  team_default: float | None = None) -> tuple[float, str]:
    """q and where it came from: the manifest's label `fleetplane/quality-share`, else the team's
    value for the task type (teams.yaml `quality_shares`), else the team's `quality_share`, else
    the task type's (catalog.yaml `quality_share`), else 0.95. A malformed label is an error
    (Unroutable naming the field), not silently ignored."""
    raw = spec.labels.get(QUALITY_LABEL)
    if raw is not None:
        try:
            q = float(raw)
        except ValueError:
            q = -1.0
        if not 0.0 <= q <= 1.0:
            raise Unroutable(f"label {QUALITY_LABEL} must be a number in [0, 1], got {raw!r}",
                             f"spec.labels.{QUALITY_LABEL}")
        return q, "manifest"
    if team_shares and spec.task_type in team_shares:
        return team_shares[spec.task_type], "team, task type"
    if team_default is not None:
        return team_default, "team"
    policy = catalog.task_types.get(spec.task_type)
    if policy is not None and policy.quality_share is not None:
        return policy.quality_share, "task type"
    return DEFAULT_QUALITY_SHARE, "default"


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


@dataclass(frozen=True)
class Estimate:
    """What the router believes of one model for this task."""

    success: float  # the centre: the posterior mean, blended with the per-prompt prediction
    judged: float  # what the objective uses: the centre, or the centre plus posterior noise
    margin: float  # z posterior standard deviations: an option must clear the target by this
    attempts: int  # outcomes of this task type on this model
    evidence: float  # attempts plus the (capped) weight of other task types' outcomes
    source: str  # "prompt" | "task type" | "other task types" | "prior"
    sampled: bool = False  # judged by a Thompson draw in this decision
    spread: float = 0.0  # the posterior's standard deviation
    name: str = ""


def _estimates(pool: list[Model], spec: TaskSpec, stats: OutcomeStats, rng: random.Random,
               explored: bool, prompt: PromptView | None,
               cfg: PolicyConfig) -> dict[str, Estimate]:
    """Per model: a Beta posterior of this task type's success (about the last stats.WINDOW
    outcomes) whose prior is `prior_strength` pseudo-outcomes at the two-way prior's mean
    (fleetplane.router.prior: how the model does on other task types and how other models do
    on this one); with prior_strength 0, Beta(1, 1) plus the model's outcomes on other task
    types as pseudo-counts (weight BORROW each, at most BORROW_CAP in all). The mean is blended
    with the per-prompt prediction once the model has enough outcomes. Exploring, only
    `sampled_per_decision` models (drawn per decision) are judged by a posterior draw: with a
    draw for every model, the cheapest of many mediocre models almost always has one lucky
    draw above the target, and exploration losses grow with the number of models."""
    out: dict[str, Estimate] = {}
    posts: list[tuple[Model, float, float, float, str, float, int]] = []
    for m in sorted(pool, key=lambda m: m.name):  # fixed draw order: deterministic
        s = stats.get(spec.task_type, m.name)
        o = stats.overall(m.name)
        other_n = o.attempts - s.attempts
        pi = stats.prior(spec.task_type, m.name) if cfg.prior_strength > 0 else None
        if pi is not None:  # the two-way prior: how the model and the task type do elsewhere
            strength = cfg.prior_strength
            if cfg.prior_strength_eb:
                strength = stats.prior_strength() or strength
            # evidence it lends: as many pseudo-outcomes as the pooled borrow would
            w = min(BORROW * other_n, BORROW_CAP) / other_n if other_n else 0.0
            alpha = strength * pi + s.recent_successes + 0.5
            beta = strength * (1 - pi) + s.recent_failures + 0.5
        else:
            w = min(BORROW * other_n, BORROW_CAP) / other_n if other_n else 0.0
            alpha = s.alpha + w * (o.successes - s.successes)
            beta = s.beta + w * (o.failures - s.failures)
        source = "task type" if s.attempts else ("other task types" if other_n else "prior")
        posts.append((m, alpha, beta, w * other_n, source, float(o.attempts), s.attempts))
    names = [p[0].name for p in posts]
    n_sampled = (cfg.price_sampled_per_decision if cfg.quality_scope == "price"
                 else cfg.sampled_per_decision)
    if not 0 < n_sampled < len(names):
        sampled = set(names)
    elif cfg.sample_by_spread:
        # the models drawn are picked with weight = their posterior's spread (Efraimidis-
        # Spirakis keys u^(1/w)): a draw of a well-known model is its mean, so the draws go
        # where the router is unsure, and a cheap model written off after a few unlucky
        # outcomes keeps being re-judged until its evidence is as firm as the others'
        keys = []
        for (m, a, b, *_rest) in posts:
            n = a + b
            sd = math.sqrt(a * b / (n * n * (n + 1)))
            keys.append((rng.random() ** (1.0 / max(sd, 1e-9)), m.name))
        sampled = {name for _, name in sorted(keys, reverse=True)[:n_sampled]}
    else:
        sampled = set(rng.sample(names, n_sampled))
    for m, alpha, beta, lent, source, overall_n, attempts in posts:
        mean = alpha / (alpha + beta)
        centre = mean
        if prompt is not None and overall_n >= cfg.signal_min_outcomes:
            p = prompt.predictions.get(m.name)
            if p is not None:
                centre = (1 - cfg.signal_weight) * mean + cfg.signal_weight * p
                source += " + prompt"
        judged = centre
        if explored and m.name in sampled:  # the posterior's spread (Thompson sampling)
            judged = min(1.0, max(0.0, centre + rng.betavariate(alpha, beta) - mean))
        n = alpha + beta
        sd = math.sqrt(alpha * beta / (n * n * (n + 1)))
        margin = cfg.confidence_z * sd
        out[m.name] = Estimate(centre, judged, margin, attempts, attempts + lent,
                               source, explored and m.name in sampled, sd, m.name)
    return out


def _skilled(prompt: PromptView | None, threshold: float) -> PromptView | None:
    """The price scope's prompt view: the predictions of the models whose prompt model has a
    skill of at least `threshold` (all of them when the view carries no skill figures)."""
    if prompt is None or prompt.skill is None:
        return prompt
    kept = {m: p for m, p in prompt.predictions.items()
            if (k := prompt.skill.get(m)) is not None and k >= threshold}
    return PromptView(kept, prompt.recent, prompt.skill) if kept else None


def _settled(est: dict[str, Estimate], costs: dict[str, float], q: float,
             cfg: PolicyConfig) -> str | None:
    """The model the type's decision has settled on, or None while exploring may change it:
    the cheapest model whose success clearly meets q x every model's (each difference at least
    `settle_z` standard deviations of the two posteriors), with every cheaper model clearly
    below q x some model's success. Only models with `min_evidence` outcomes count; an
    untried model keeps the type exploring."""
    if any(e.attempts < cfg.min_evidence for e in est.values()):
        return None
    z = cfg.settle_z

    def clearly_above(a: Estimate, b: Estimate) -> bool:  # a meets q x b's success
        return a.name == b.name or (a.success - q * b.success
                                    >= z * math.hypot(a.spread, q * b.spread))

    by_cost = sorted(est.values(), key=lambda e: (costs[e.name], e.name))
    for e in by_cost:
        if all(clearly_above(e, b) for b in est.values()):
            return e.name
        if not any(q * b.success - e.success >= z * math.hypot(e.spread, q * b.spread)
                   for b in est.values() if b.name != e.name):
            return None  # neither clearly above nor clearly below: keep exploring
    return None


def _prompt_rank(mix: Mixture, prompt: PromptView | None, est: dict[str, Estimate], u: float,
                 cfg: PolicyConfig) -> float | None:
    """Where this prompt's predicted gain of the mixture's dear model over its cheap one ranks
    among the task type's recent prompts (0: the largest gain; ties broken by `u`, so prompts
    the predictions do not tell apart get the plain mixture draw), or None when the mixture is
    a single model or the predictions are not usable. The dear model then goes to the prompts
    ranked in the top `upper_share`: the same share of the type's work as the mixture's draw,
    spent where the prompt model expects it to make the difference (a Lagrangian pick with
    the type's price of a success, keeping the mixture's proportion)."""
    if (not cfg.prompt_rank or prompt is None or prompt.recent is None or mix.lower is None
            or len(prompt.recent) < cfg.prompt_rank_min):
        return None
    hi, lo = mix.upper.name, mix.lower.name
    if "prompt" not in est[hi].source or "prompt" not in est[lo].source:
        return None  # the per-prompt model has too few outcomes of one of them
    p_hi, p_lo = prompt.predictions.get(hi), prompt.predictions.get(lo)
    if p_hi is None or p_lo is None:
        return None
    gains = prompt.recent.gains(hi, lo)
    if len(gains) < cfg.prompt_rank_min:
        return None
    gain = p_hi - p_lo
    above = int((gains > gain + 1e-6).sum())
    ties = int((abs(gains - gain) <= 1e-6).sum())
    return (above + u * ties) / len(gains)


def _pooled(stats: OutcomeStats, q: float, cfg: PolicyConfig) -> dict[str, TypeTarget]:
    """The pooled program's targets, solved again after every POOLED_EVERY outcomes (its cost
    grows with task types x models; one outcome barely moves it)."""
    key = ("pooled", q, cfg.repay_horizon, cfg.pooled_floor)
    got = stats.memo.get(key)
    if got is not None:
        version, cached = cast(tuple[int, dict[str, TypeTarget]], got)
        if stats.version - version < POOLED_EVERY:
            return cached
    targets = pooled_targets(stats, q, cfg.repay_horizon, cfg.pooled_floor)
    stats.memo[key] = (stats.version, targets)
    return targets


def choose(catalog: Catalog, spec: TaskSpec, stats: OutcomeStats, *, key: str,
           cfg: PolicyConfig | None = None, budget: BudgetView | None = None,
           escalate_to: str | None = None, q: float = DEFAULT_QUALITY_SHARE,
           q_source: str = "default", prompt: PromptView | None = None) -> Decision:
    """Pick the model for one attempt. `key` (task id and attempt) makes exploration, the
    Thompson draws and the mixture draw deterministic. `q`: the quality share of the objective
    (see quality_share). `prompt`: the per-prompt success predictions, when the router has them.
    Raises Unroutable when no model can take the task."""
    cfg = cfg or PolicyConfig()
    budget = budget or BudgetView()
    models = list(catalog.models.values())
    refused = {m.name: why for m in models if (why := incapable(m, spec)) is not None}
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
                        _alternatives(models, model, refused, spec, stats, costs, None),
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
    if budget.low:
        q = min(q, cfg.low_budget_quality_share)
    rng = random.Random(_seed(key, "thompson"))
    if cfg.quality_scope == "price":
        # a per-prompt Lagrangian pick turns the prompt model's noise into dear picks (on the
        # development set, where it is near chance: 96.6% / 74% against 94.7% / 53%), so only
        # the predictions with measured skill count
        prompt = _skilled(prompt, cfg.price_prompt_skill)
    est = _estimates(pool, spec, stats, rng, explored, prompt, cfg)
    settled = _settled(est, costs, q, cfg) if explored and cfg.settle_z > 0 else None
    if settled is not None:  # the bar is clear: judge by the estimates, no draws
        explored = False
        est = _estimates(pool, spec, stats, rng, explored, prompt, cfg)
    # Without exploring, only models with evidence are judged (an untried model's 0.5 prior
    # is not a reason to send it work); exploring, every capable model competes by its sample.
    judged = {name: e for name, e in est.items()
              if explored or cfg.confidence_z < 0 or e.evidence >= cfg.min_evidence}
    options = [Option(name, e.judged, costs[name]) for name, e in judged.items()]
    if not options:
        model, cost = fallback, costs[fallback.name]
        reason = (f"{why}; no model has {cfg.min_evidence:g} outcomes of {spec.task_type} "
                  f"yet, so the tier's default {model.name}")
        if budget.low and budget.note:
            reason += f"; {budget.note}"
        return Decision(model, rule, reason,
                        _alternatives(models, model, refused, spec, stats, costs, est), cost)
    # The target is q x the best judged success. The other options are judged z posterior
    # standard deviations lower (pessimism about cheap models with thin evidence), and the
    # target rises by the task type's realised shortfall (what exploration and estimation
    # missed so far is made up by later decisions).
    top_draw = max(options, key=lambda o: (o.success, -o.cost, o.name))
    if cfg.quality_scope == "price":
        name, reason = _by_price(est, judged, costs, key, q, q_source, stats, explored,
                                 top_draw, cfg)
        chosen = catalog.models[name]
        rule = "explore" if explored else ("learned" if rule in ("task_type", "default")
                                           else rule)
        return Decision(chosen, rule,
                        f"{reason}; {why}" + (f"; {budget.note}" if budget.low and budget.note
                                              else ""),
                        _alternatives(models, chosen, refused, spec, stats, costs, est),
                        costs[name], explored=explored)
    if cfg.best_from_samples or not explored:
        best = top_draw
    else:  # the target from the best posterior mean; samples only move the candidates
        best = max(options, key=lambda o: (est[o.name].success, -o.cost, o.name))
        best = Option(best.name, est[best.name].success, best.cost)
        options = [best if o.name == best.name else o for o in options]
    target = q * best.success
    realised = stats.of_type(spec.task_type)
    shortfall = rate = 0.0
    leader = max(options, key=lambda o: (est[o.name].success, -o.cost, o.name))
    if cfg.ledger:
        # the success ledger: over the type's recent outcomes (discounted to ~stats.WINDOW),
        # what q x the best model's estimated success would have delivered minus what the
        # decisions delivered; a deficit (exploration, early estimates) raises the target
        # until it is repaid over `repay_horizon` decisions, a surplus lowers it
        n_w = realised.recent_successes + realised.recent_failures
        # the best model's success: the mean of the model with the largest lower bound (mean
        # less one posterior standard deviation), since the largest of several noisy means is
        # biased up (a model with a few lucky outcomes is not the reference)
        ref = max((e for e in est.values() if e.name in judged),
                  key=lambda e: (e.success - e.spread, e.name))
        owed = q * ref.success * n_w - realised.recent_successes
        if not cfg.ledger_spend:
            owed = max(0.0, owed)
        # a dead band of `ledger_band` binomial standard errors of the window's count: the
        # leader's estimate is the largest of several noisy means (biased up), and a deficit
        # within noise is not one
        band = cfg.ledger_band * math.sqrt(n_w * 0.25)  # 0.25: the binomial variance's bound
        owed = math.copysign(max(0.0, abs(owed) - band), owed)
        rate = realised.recent_successes / n_w if n_w else 0.0
        shortfall = owed / cfg.repay_horizon
    elif realised.attempts >= cfg.min_evidence:
        rate = (stats.recent_rate(spec.task_type) if cfg.shortfall_recent
                else realised.successes / realised.attempts)
        # a dead band of one standard error: noise in the realised rate is not a shortfall
        n = min(realised.attempts, RECENT) if cfg.shortfall_recent else realised.attempts
        shortfall = max(0.0, target - rate - math.sqrt(target * (1 - target) / n))
    raised = (target + shortfall if cfg.ledger else target + cfg.shortfall_gain * shortfall)
    eff_q = min(1.0, max(0.0, raised / best.success)) if best.success else q
    pooled = _pooled(stats, q, cfg).get(spec.task_type) if cfg.quality_scope == "pooled" else None
    if pooled is not None:
        eff_q = min(1.0, max(0.0, pooled.rate / pooled.best))
    shifted = [Option(o.name, o.success if o.name == best.name
                      else min(1.0, max(0.0, o.success - judged[o.name].margin)), o.cost)
               for o in options]
    mix = solve(shifted, eff_q)
    u = _seed(key, "mixture") / 2**64
    picked = mix.pick(u)
    ranked = _prompt_rank(mix, prompt, est, u, cfg)
    if ranked is not None:
        picked = mix.upper if ranked < mix.upper_share else mix.lower or mix.upper
    contender = None
    if (cfg.play_contender and explored and est[top_draw.name].sampled
            and top_draw.name != leader.name
            and (not cfg.contender_must_matter
                 or q * top_draw.success > est[leader.name].success)
            and (not cfg.contender_vs_draw
                 or q * top_draw.success > est[leader.name].judged)):
        # a draw says another model may be the best: try it, or the target stays anchored to
        # an incumbent that merely had luckier first outcomes
        picked = contender = top_draw
    model, cost = catalog.models[picked.name], costs[picked.name]
    if rule in ("task_type", "default"):
        rule = "learned"
    if explored:
        rule = "explore"
    how = "Thompson sample" if explored else "estimate"
    b, p = est[mix.best.name], est[picked.name]
    reason = (f"{'exploring' if explored else 'objective'}: lowest expected cost with success "
              f">= q {q:.2f} ({q_source}) x best; best {mix.best.name} {how} "
              f"{mix.best.success:.2f} ({b.attempts} outcomes, {b.source}) -> target "
              f"{mix.target:.2f}")
    if pooled is not None:
        reason += (f" (pooled over all task types: {spec.task_type} is asked for success "
                   f"{pooled.rate:.2f} of its best {pooled.best:.2f} at the fleet's price of "
                   f"${pooled.price:.6f} per success)")
    elif cfg.ledger and abs(shortfall) >= 0.005:
        owed = shortfall * cfg.repay_horizon
        reason += (f" ({'raised' if owed > 0 else 'lowered'}: {spec.task_type}'s success "
                   f"ledger is {abs(owed):.1f} successes {'short of' if owed > 0 else 'ahead of'}"
                   f" q x best over its recent outcomes (rate {rate:.2f}), repaid over "
                   f"{cfg.repay_horizon:g} decisions)")
    elif not cfg.ledger and shortfall > 0:
        reason += (f" (raised: {spec.task_type}'s recent success {rate:.2f} is short of "
                   f"{target:.2f})")
    reason += "; "
    if contender is not None:
        reason += (f"trying {model.name}: its draw {contender.success:.2f} beats the leader "
                   f"{leader.name} ({est[leader.name].success:.2f}), so it may be the best "
                   f"({p.attempts} outcomes, {p.source}, est. ${cost:.6f})")
    elif mix.lower is None:
        reason += (f"{model.name} is the cheapest model meeting it ({how} less margin "
                   f"{picked.success:.2f}, {p.attempts} outcomes, {p.source}, est. ${cost:.6f})")
    else:
        reason += (f"mix {mix.upper.name} ({mix.upper.success:.2f}) {mix.upper_share:.0%} with "
                   f"cheaper {mix.lower.name} ({mix.lower.success:.2f}) meets it at est. "
                   f"${mix.expected_cost:.6f}; drew {model.name} ({p.attempts} outcomes, "
                   f"{p.source})")
    reason += f"; {why}"
    if budget.low and budget.note:
        reason += f"; {budget.note}"
    return Decision(model, rule, reason,
                    _alternatives(models, model, refused, spec, stats, costs, est), cost,
                    explored=explored)


def _by_price(est: dict[str, Estimate], judged: dict[str, Estimate], costs: dict[str, float],
              key: str, q: float, q_source: str, stats: OutcomeStats, explored: bool,
              top_draw: Option, cfg: PolicyConfig) -> tuple[str, str]:
    """The price scope (fleetplane.router.price): the model with the largest value
    price x judged success - cost, where the price of a success is held by the ledger over all
    task types. Two exceptions learn what the promise is measured against: REFERENCE_SHARE of
    decisions go to the model most plausibly the best (largest estimate plus one posterior
    standard deviation, tried or not), and a sampled model whose draw beats the leader is tried
    (the contender rule, as in the other scopes)."""
    dearest = max(costs[name] for name in est)
    pr = success_price(stats, q, dearest, cfg.prior_strength)
    head = (f"{'exploring' if explored else 'objective'}: lowest expected cost at the price "
            f"${pr.price:.6f} per success, which keeps success >= q {q:.2f} ({q_source}) x "
            f"best over all task types (ledger {abs(pr.owed):.1f} successes "
            f"{'short' if pr.owed > 0 else 'ahead'})")
    if _seed(key, "reference") / 2**64 < REFERENCE_SHARE:
        ref = max(est.values(), key=lambda e: (e.success + e.spread, e.name))
        return ref.name, (f"{head}; sampling the reference: {ref.name} may be the best model "
                          f"({ref.success:.2f} +- {ref.spread:.2f}, {ref.attempts} outcomes)")
    leader = max(judged.values(), key=lambda e: (e.success, -costs[e.name], e.name))
    if (cfg.play_contender and explored and est[top_draw.name].sampled
            and top_draw.name != leader.name):
        return top_draw.name, (f"{head}; trying {top_draw.name}: its draw "
                               f"{top_draw.success:.2f} beats the leader {leader.name} "
                               f"({leader.success:.2f}), so it may be the best")
    value = {name: pr.price * e.judged - costs[name] for name, e in judged.items()}
    picked = max(value, key=lambda n: (value[n], -costs[n], n))
    e = judged[picked]
    return picked, (f"{head}; {picked} has the largest value: {'draw' if e.sampled else 'est.'}"
                    f" {e.judged:.2f} x price - est. ${costs[picked]:.6f} ({e.attempts} "
                    f"outcomes, {e.source})")


def _nothing_fits(refused: dict[str, str]) -> str:
    detail = "; ".join(f"{n}: {why}" for n, why in sorted(refused.items()))
    return f"no model in the catalog can take this task ({detail})"


def _alternatives(models: list[Model], chosen: Model, refused: dict[str, str], spec: TaskSpec,
                  stats: OutcomeStats, costs: dict[str, float],
                  est: dict[str, Estimate] | None) -> list[str]:
    """Every other model with why it was not chosen: capability, or estimate and cost."""
    out = []
    for m in sorted(models, key=lambda m: (costs[m.name], m.name)):
        if m.name == chosen.name:
            continue
        if m.name in refused:
            out.append(f"{m.name} ({m.tier}): {refused[m.name]}")
            continue
        s = stats.get(spec.task_type, m.name)
        e = est.get(m.name) if est else None
        if e is None:
            out.append(f"{m.name} ({m.tier}): success {s.mean:.2f} over {s.attempts} attempts, "
                       f"est. ${costs[m.name]:.6f}")
        else:
            out.append(f"{m.name} ({m.tier}): success {e.success:.2f} ({e.source}, "
                       f"{e.attempts} attempts), est. ${costs[m.name]:.6f}")
    return out
