"""The routing objective on generated worlds with known success rates: lowest expected cost
subject to success >= q x the best model's, with the best model's success learned by exploring.

Outcomes are drawn from fixed per-model success rates (seeded); the router sees only the outcome
of the model it picked (bandit feedback), through the real policy and statistics."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from fleetplane.core.catalog import Catalog, catalog_for
from fleetplane.core.events import TaskSpec
from fleetplane.core.settings import Settings
from fleetplane.router.features import FeatureCache, HashingEmbedder
from fleetplane.router.objective import Option, solve
from fleetplane.router.policy import (
    PolicyConfig,
    PromptView,
    Unroutable,
    choose,
    estimate_cost,
    quality_share,
)
from fleetplane.router.signal import PromptSignal
from fleetplane.router.stats import OutcomeStats


def catalog() -> Catalog:
    return catalog_for(Settings().catalog_file)


def spec(**fields: Any) -> TaskSpec:
    base: dict[str, Any] = {"name": "n", "task_type": "codegen", "prompt": "write a parser"}
    base.update(fields)
    return TaskSpec(**base)


def run_world(stats: OutcomeStats, world: dict[str, float], n: int, prefix: str,
              rng: random.Random, q: float = 0.95,
              cfg: PolicyConfig | None = None) -> list[tuple[str, bool]]:
    """n decisions in a world where model m succeeds with probability world[m]."""
    cat = catalog()
    out = []
    for i in range(n):
        s = spec()
        d = choose(cat, s, stats, key=f"{prefix}-{i}/1", q=q, cfg=cfg)
        ok = rng.random() < world[d.model.name]
        stats.record("codegen", d.model.name, ok, estimate_cost(d.model, s))
        out.append((d.model.name, ok))
    return out


# -- the linear program ---------------------------------------------------------------------
def test_the_cheapest_mixture_meets_q_times_the_best_exactly() -> None:
    cheap, mid, best = Option("cheap", 0.70, 1.0), Option("mid", 0.90, 5.0), Option("best", 0.96,
                                                                                     10.0)
    mix = solve([cheap, mid, best], 0.95)
    assert mix.best == best and mix.target == pytest.approx(0.912)
    # mid alone misses 0.912; mid with 20% best meets it exactly at 6.0 (cheap+best: 8.35)
    assert (mix.lower, mix.upper) == (mid, best)
    assert mix.upper_share == pytest.approx(0.2)
    assert mix.expected_success == pytest.approx(0.912)
    assert mix.expected_cost == pytest.approx(6.0)
    assert mix.pick(0.1) == best and mix.pick(0.5) == mid
    # a model that meets the target on its own and is cheapest is taken alone
    alone = solve([Option("a", 0.95, 2.0), best], 0.95)
    assert alone.lower is None and alone.upper.name == "a"
    # q = 1: only the best model's success will do
    assert solve([cheap, mid, best], 1.0).upper == best
    with pytest.raises(ValueError):
        solve([cheap], 1.5)


# -- the bandit on generated worlds ---------------------------------------------------------
def test_converges_to_the_cheapest_model_that_meets_q_and_moves_when_it_degrades() -> None:
    world = {"fleet-local-coder": 0.3, "gpt-4o-mini": 0.92, "claude-haiku-4-5": 0.93,
             "claude-sonnet-4-6": 0.94, "claude-opus-4-7": 0.95}
    rng = random.Random(3)
    stats = OutcomeStats()
    first = run_world(stats, world, 1500, "a", rng, q=0.9)
    head, tail = first[:500], first[-500:]
    picks = Counter(m for m, _ in tail)
    # 0.9 x 0.95 = 0.855: gpt-4o-mini (0.92) is the cheapest model that meets it
    assert picks["gpt-4o-mini"] >= 0.8 * len(tail), picks
    assert picks["gpt-4o-mini"] > Counter(m for m, _ in head)["gpt-4o-mini"]
    assert sum(ok for _, ok in tail) / len(tail) >= 0.855 - 0.03
    assert picks["claude-opus-4-7"] < 0.1 * len(tail)  # the best model is not the answer
    # gpt-4o-mini degrades: the router moves to the next cheapest model that meets q x best
    world["gpt-4o-mini"] = 0.5
    second = run_world(stats, world, 1500, "b", rng, q=0.9)
    picks = Counter(m for m, _ in second[-300:])
    assert picks["claude-haiku-4-5"] >= 0.6 * 300, picks
    # the degraded model keeps only a mixing share (the LP's optimum with the true rates is
    # 17% gpt-4o-mini with 83% claude-haiku-4-5), and expected success stays at the target
    assert picks["gpt-4o-mini"] < 0.3 * 300, picks
    assert sum(world[m] * n for m, n in picks.items()) / 300 >= 0.855 - 0.03


def test_the_best_models_success_is_learned_not_a_configured_target() -> None:
    """All models are poor (codegen's configured quality_target 0.8 is out of reach): the
    objective is relative, so the router still finds the cheapest model within q of the best."""
    world = {"fleet-local-coder": 0.1, "gpt-4o-mini": 0.5, "claude-haiku-4-5": 0.5,
             "claude-sonnet-4-6": 0.52, "claude-opus-4-7": 0.53}
    out = run_world(OutcomeStats(), world, 1500, "p", random.Random(5), q=0.9)
    picks = Counter(m for m, _ in out[-400:])
    assert picks["gpt-4o-mini"] >= 0.6 * 400, picks


def test_every_decision_says_why_with_q_best_and_target() -> None:
    stats = OutcomeStats()
    for i in range(40):
        stats.record("codegen", "gpt-4o-mini", i % 10 != 0, 0.001)
        stats.record("codegen", "claude-opus-4-7", True, 0.05)
    # q kept per task type: the reason names q, the best model and the target
    typed = PolicyConfig(exploration_share=0.0, quality_scope="type")
    d = choose(catalog(), spec(), stats, key="why/1", cfg=typed)
    assert d.reason.startswith("objective: lowest expected cost with success >= q 0.95")
    assert "best claude-opus-4-7" in d.reason and "target" in d.reason
    assert "maps to tier standard" in d.reason
    typed_x = PolicyConfig(exploration_share=1.0, quality_scope="type")
    e = choose(catalog(), spec(), stats, key="why/1", cfg=typed_x)
    assert e.explored and e.reason.startswith("exploring:") and "Thompson sample" in e.reason
    assert choose(catalog(), spec(), stats, key="why/1",
                  cfg=typed_x).reason == e.reason  # deterministic
    # the default (price) scope: q, the price of a success, the ledger and the pick's value
    d = choose(catalog(), spec(), stats, key="why/1", cfg=PolicyConfig(exploration_share=0.0))
    assert d.reason.startswith("objective: lowest expected cost at the price $")
    assert "q 0.95 (default) x best" in d.reason and "ledger" in d.reason
    assert f"{d.model.name} has the largest value" in d.reason
    assert "maps to tier standard" in d.reason
    e = choose(catalog(), spec(), stats, key="why/1", cfg=PolicyConfig(exploration_share=1.0))
    assert e.explored and e.reason.startswith("exploring:")
    assert choose(catalog(), spec(), stats, key="why/1",
                  cfg=PolicyConfig(exploration_share=1.0)).reason == e.reason  # deterministic


# -- q: per team, task type and manifest ------------------------------------------------------
def test_q_comes_from_the_manifest_then_team_then_task_type_then_default() -> None:
    cat = catalog()
    assert quality_share(cat, spec()) == (0.95, "default")
    assert quality_share(cat, spec(), team_default=0.9) == (0.9, "team")
    assert quality_share(cat, spec(), {"codegen": 0.97}, 0.9) == (0.97, "team, task type")
    labelled = spec(labels={"fleetplane/quality-share": "0.8"})
    assert quality_share(cat, labelled, {"codegen": 0.97}, 0.9) == (0.8, "manifest")
    for bad in ("high", "1.5", "-0.1"):
        with pytest.raises(Unroutable) as exc:
            quality_share(cat, spec(labels={"fleetplane/quality-share": bad}))
        assert exc.value.field == "spec.labels.fleetplane/quality-share"


# -- per-prompt signal ------------------------------------------------------------------------
def test_an_unseen_task_type_borrows_from_similar_prompts() -> None:
    """gpt-4o-mini succeeds at translations and fails at arithmetic, the local coder the other
    way round; a new task type of translation prompts is routed by what similar prompts did."""
    features = FeatureCache(HashingEmbedder())
    signal = PromptSignal()
    stats = OutcomeStats()
    rng = random.Random(1)
    words = ["house", "river", "friend", "window", "garden", "letter", "music", "winter"]
    for i in range(300):
        if i % 2:
            task_type, prompt = "translate-fr", (f"Translate to French: the {rng.choice(words)} "
                                                 f"and the {rng.choice(words)}")
            good = "gpt-4o-mini"
        else:
            task_type, prompt = "arithmetic", (f"Compute {rng.randint(10, 99)} * "
                                               f"{rng.randint(10, 99)} + {rng.randint(1, 9)}")
            good = "fleet-local-coder"
        x = features.vector(f"train-{i}", prompt)
        for model in ("gpt-4o-mini", "fleet-local-coder"):
            ok = model == good
            signal.update(model, task_type, x, ok)
            stats.record(task_type, model, ok, 0.001)
    new = spec(task_type="translate-de", prompt="Translate to German: the river and the garden")
    x = features.vector("new-1", new.prompt)
    p = signal.predict_many(["gpt-4o-mini", "fleet-local-coder"], "translate-de", x)
    assert p["gpt-4o-mini"] > 0.7 > 0.3 > p["fleet-local-coder"]
    cat = catalog()
    small_only = Catalog(tiers=cat.tiers, default_tier="small", task_types={},
                         models={n: cat.models[n] for n in ("gpt-4o-mini", "fleet-local-coder")})
    d = choose(small_only, new, stats, key="new-1/1", cfg=PolicyConfig(exploration_share=0.0),
               prompt=PromptView(p))
    assert d.model.name == "gpt-4o-mini" and "prompt" in d.reason
    # the arithmetic prompt of the same unseen type goes the other way
    m = spec(task_type="translate-de", prompt="Compute 12 * 40 + 3")
    pm = signal.predict_many(["gpt-4o-mini", "fleet-local-coder"], "translate-de",
                             features.vector("new-2", m.prompt))
    d2 = choose(small_only, m, stats, key="new-2/1", cfg=PolicyConfig(exploration_share=0.0),
                prompt=PromptView(pm))
    assert d2.model.name == "fleet-local-coder"


def test_features_are_computed_once_per_task() -> None:
    class Counting(HashingEmbedder):
        calls = 0

        def embed(self, texts: list[str]) -> Any:
            Counting.calls += len(texts)
            return super().embed(texts)

    cache = FeatureCache(Counting())
    a = cache.vector("t1", "Translate to French: hello")
    b = cache.vector("t1", "Translate to French: hello")
    assert (a == b).all() and Counting.calls == 1 and cache.computed == 1
    cache.vectors([("t1", "x"), ("t2", "y"), ("t3", "z")])
    assert Counting.calls == 3  # one batch for the two new tasks


def test_the_bundled_embedding_loads_offline_and_separates_topics() -> None:
    from fleetplane.router.features import WordLlamaEmbedder

    emb = WordLlamaEmbedder()  # reads the wheel's files; no network here or in CI
    v = emb.embed(["Translate this sentence to French", "Translate this text into German",
                   "def parse(s): return int(s)"])
    assert v.shape == (3, 256)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2


def test_a_best_model_with_a_bad_start_is_not_locked_out() -> None:
    """The frontier model fails 70% of its first 40 tasks (then succeeds 90%); the cheap ones
    succeed 60-70%, so q 0.95 needs the frontier model. A Thompson draw that says it may be the
    best sends it a task (a contender is tried), so its estimate recovers. Worlds 9, 16 and 19
    of 20 generated ones are those where, without that rule, it was locked out (9, 7 and 15
    tasks of 600); world 0 is an ordinary one."""
    from fleetplane.router import evaluate as ev_

    models = {"cheap-a": (0.62, 0.0002, "small"), "cheap-b": (0.6, 0.0003, "small"),
              "mid": (0.7, 0.001, "standard"), "best": (0.9, 0.01, "frontier")}
    for seed in (0, 9, 16, 19):
        rng = random.Random(seed)
        tasks = []
        for i in range(600):
            cands = {}
            for m, (p, cost, tier) in models.items():
                ok = rng.random() < (0.3 if m == "best" and i < 40 else p)
                cands[m] = ev_.Observation(success=ok, cost_usd=cost, tier=tier)
            tasks.append(ev_.EvalTask(task_id=f"w{seed}-{i}", task_type="qa", candidates=cands))
        r = ev_.replay_router(tasks, catalog(), ev_.RouterConfig(prompt_signal=False))
        assert r.picks.get("best", 0) >= 100, (seed, r.picks)


def test_the_two_way_prior_borrows_model_and_task_type_effects() -> None:
    """A model weak wherever it ran starts low on a task type it never ran; a task type on
    which every model does well starts high for a model that never ran it."""
    from fleetplane.router.prior import TwoWayPrior

    prior = TwoWayPrior()
    cells = [("easy", "strong", 95, 100), ("easy", "weak", 70, 100),
             ("hard", "strong", 60, 100), ("hard", "weak", 20, 100),
             ("easy", "other", 90, 100)]
    for _ in range(5):
        prior.fit(cells)
    strong, weak = prior.predict("new", "strong"), prior.predict("new", "weak")
    assert strong is not None and weak is not None and strong > weak + 0.2
    easy_other, hard_other = prior.predict("easy", "other"), prior.predict("hard", "other")
    assert easy_other is not None and hard_other is not None and easy_other > hard_other + 0.2
    assert prior.predict("easy", "never-ran") is None


def test_the_success_ledger_holds_q_on_realised_outcomes_from_a_cold_start() -> None:
    """Exploring five cheaper models loses successes; the ledger makes the decisions that follow
    repay them, so the realised success of the whole run (exploration included) is within a
    point of q x the best model's (0.95 x 0.9). Without it (the earlier recent-rate correction
    with its dead band) the mean over these four worlds was 0.839."""
    from fleetplane.router import evaluate as ev_

    models = {"c1": (0.55, 0.0001, "small"), "c2": (0.6, 0.0002, "small"),
              "c3": (0.65, 0.0003, "small"), "m1": (0.7, 0.001, "standard"),
              "m2": (0.8, 0.0012, "standard"), "best": (0.9, 0.01, "frontier")}
    rates = []
    for seed in range(4):
        rng = random.Random(seed)
        tasks = []
        for i in range(1500):
            d = rng.random()  # nested outcomes: a task a weaker model solves, a stronger one does
            cands = {m: ev_.Observation(success=d < p, cost_usd=c, tier=t)
                     for m, (p, c, t) in models.items()}
            tasks.append(ev_.EvalTask(task_id=f"l{seed}-{i}", task_type="qa", candidates=cands))
        r = ev_.replay_router(tasks, catalog(), ev_.RouterConfig(prompt_signal=False))
        rates.append(r.success_rate)
        # not all-frontier; the bound is near the arithmetic's: q x best needs 55% of picks on
        # "best" with m2, plus 10 per success lost exploring (~30 allowed; seed 1 loses ~44,
        # docs/routing.md, tenth round)
        assert r.picks.get("best", 0) < 0.75 * len(tasks), r.picks
    assert sum(rates) / len(rates) >= 0.95 * 0.9 - 0.01, rates


def test_the_two_way_prior_weighs_as_much_as_the_table_says_it_predicts() -> None:
    """Empirical Bayes: where every pair's success rate is what the two-way model predicts
    (up to binomial noise), the prior is worth many outcomes; where models are good at some
    task types and poor at others, it is worth few."""
    from fleetplane.router.prior import TwoWayPrior

    rng = random.Random(4)
    types = [f"t{i}" for i in range(20)]
    ease = {t: rng.uniform(-1.0, 2.0) for t in types}

    def cells(interaction: float) -> list[tuple[str, str, float, float]]:
        out = []
        for t in types:
            for m, skill in (("cheap", -0.3), ("dear", 0.3)):
                z = ease[t] + skill + rng.gauss(0.0, interaction)
                p = 1 / (1 + 2.718281828 ** -z)
                n = 200
                out.append((t, m, float(sum(rng.random() < p for _ in range(n))), float(n)))
        return out

    additive, mixed = TwoWayPrior(), TwoWayPrior()
    additive_cells, mixed_cells = cells(0.0), cells(1.5)
    for _ in range(6):
        additive.fit(additive_cells)
        mixed.fit(mixed_cells)
    assert additive.strength is not None and mixed.strength is not None
    assert additive.strength >= 50, (additive.strength, mixed.strength)
    assert mixed.strength <= 10, mixed.strength
    assert TwoWayPrior().strength is None  # nothing fitted: the configured strength applies


def _two_model_replay(p_cheap: float, p_dear: float, seed: int, cfg: PolicyConfig,
                      n: int = 600) -> tuple[Counter[str], list[str], int]:
    """n tasks of one type, a cheap and a dear model with independent outcomes: the picks,
    each decision's rule and how many decisions tried a contender, through the real policy
    with bandit feedback."""
    from fleetplane.router import evaluate as ev_

    rng = random.Random(seed)
    cat = catalog()
    stats = OutcomeStats()
    picks: Counter[str] = Counter()
    rules = []
    contenders = 0
    for i in range(n):
        cands = {"cheap": ev_.Observation(success=rng.random() < p_cheap, cost_usd=0.0006,
                                          tier="standard"),
                 "dear": ev_.Observation(success=rng.random() < p_dear, cost_usd=0.01,
                                         tier="frontier")}
        task = ev_.EvalTask(task_id=f"p{seed}-{i}", task_type="qa", candidates=cands)
        d = choose(ev_.task_catalog(cat, task), ev_.task_spec(task), stats,
                   key=f"{task.task_id}/1", cfg=cfg)
        picks[d.model.name] += 1
        rules.append(d.rule)
        contenders += "; trying " in d.reason
        obs = cands[d.model.name]
        stats.record("qa", d.model.name, obs.success, obs.cost_usd)
    return picks, rules, contenders


def test_a_contender_judged_against_the_leaders_draw_is_tried_less_where_it_does_not_matter(
) -> None:
    """Two models equally good: the default tries the dear one whenever its draw beats the
    cheap leader (about half of the exploring decisions); `contender_vs_draw` only when q x
    its draw would make the leader's own draw miss the target."""
    # a knob of the per-type scope (the price scope does not apply it: docs/routing.md)
    plain = [_two_model_replay(0.8, 0.8, s, PolicyConfig(quality_scope="type"))
             for s in range(3)]
    vs_draw = [_two_model_replay(0.8, 0.8, s, PolicyConfig(contender_vs_draw=True,
                                                           quality_scope="type"))
               for s in range(3)]
    tried = sum(r[2] for r in plain), sum(r[2] for r in vs_draw)
    dear = sum(r[0]["dear"] for r in plain), sum(r[0]["dear"] for r in vs_draw)
    assert tried[1] < 0.6 * tried[0], tried
    assert dear[1] < dear[0], dear


def test_exploration_ends_once_the_cheap_model_is_clearly_above_the_bar() -> None:
    """With `settle_z`, a type whose cheap model clearly meets q x the dear one's success stops
    exploring (decisions by the estimates, rule 'learned'); by default every decision explores."""
    picks, rules, _ = _two_model_replay(0.9, 0.6, 1, PolicyConfig(settle_z=2.0))
    assert rules[-100:].count("learned") == 100, Counter(rules[-100:])
    assert picks["cheap"] >= 0.9 * sum(picks.values()), picks
    _, rules, _ = _two_model_replay(0.9, 0.6, 1, PolicyConfig())
    assert rules[-100:].count("explore") == 100
