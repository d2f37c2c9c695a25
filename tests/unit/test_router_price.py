"""The price scope (fleetplane.router.price): one price of a success over all task types, held by
the success ledger; each decision takes the model with the largest price x success - cost."""

from __future__ import annotations

from fleetplane.core.catalog import load_catalog
from fleetplane.core.settings import Settings
from fleetplane.router.evalgen import generate_subjects
from fleetplane.router.evaluate import EvalTask, evaluate
from fleetplane.router.price import START_GAIN, best_success, success_price
from fleetplane.router.stats import OutcomeStats
from tests.unit.test_router_pooled import _record


def test_the_price_falls_with_a_surplus_and_rises_with_a_deficit() -> None:
    stats = OutcomeStats()
    _record(stats, "qa", "big", 90, 100, 1.0)  # the best model's own work: 0.9 > q x 0.9
    start = 1.0 / START_GAIN  # the dearest model's mean cost / START_GAIN
    ahead = success_price(stats, 0.95, 0.0)
    assert ahead.owed < 0 and ahead.price < start
    _record(stats, "qa", "small", 20, 100, 0.1)  # the cheap model misses 80 of 100
    short = success_price(stats, 0.95, 0.0)
    assert short.owed > 0 and short.price > start
    # the deficit is q x best over the recent volume minus the successes delivered
    assert abs(short.owed - (0.95 * stats.get("qa", "big").mean * 200 - 110)) < 1.0


def test_the_reference_of_a_type_with_few_outcomes_of_its_best_model_is_not_pulled_to_half(
) -> None:
    """The promise is q x each type's best model's success. On a new type whose best model
    ran 6 times (6 successes) while it succeeds 95% on 8 other types, its success is judged
    with the policy's posterior (the two-way prior's 4 pseudo-outcomes), not Beta(1, 1): the
    latter says 7/8 = 0.875, so the ledger promised less than q x best (on the calibrated
    two-model world of seed 5 the aggregate landed at 94.5% of all-frontier's, 5 orders)."""
    stats = OutcomeStats()
    for t in range(8):
        _record(stats, f"t{t}", "big", 57, 60, 0.01)  # 0.95
        _record(stats, f"t{t}", "small", 36, 60, 0.001)  # 0.6
    _record(stats, "new", "big", 6, 6, 0.01)
    _record(stats, "new", "small", 4, 6, 0.001)
    assert best_success(stats, "new") < 0.88  # Beta(1, 1)
    assert best_success(stats, "new", 4.0) > 0.91  # measured 0.93
    # the ledger owes q x the larger references over the same outcomes
    flat, shared = success_price(stats, 0.95, 0.0), success_price(stats, 0.95, 0.0, 4.0)
    more = sum((best_success(stats, t, 4.0) or 0) - (best_success(stats, t) or 0)
               for t in stats.task_types() if t != "new") * 120
    more += (best_success(stats, "new", 4.0) or 0) * 12 - (best_success(stats, "new") or 0) * 12
    assert shared.owed > flat.owed
    assert abs(shared.owed - flat.owed - 0.95 * more) < 1e-6


def _subjects(n: int, seed: int) -> list[EvalTask]:
    rows = generate_subjects(n, seed, types=12, gaps=(0.0, 0.0, 0.0, 0.02, 0.04, 0.1, 0.2),
                             nested=False)
    return [EvalTask.model_validate(r) for r in rows]


def test_the_price_scope_keeps_q_over_all_types_for_far_less_than_per_type_targets() -> None:
    """Two models, 12 task types (the held-out set's shape, smaller): per task type the router
    holds q on every type, so the types where the cheap model is as good deliver more than q
    and the whole pays for it; with one price of a success the dear model goes where a
    success is cheapest, and the aggregate promise is held for less (success / cost as % of
    all-frontier's, per type -> price: seed 5 96.3 / 34.1 -> 95.4 / 23.0, seed 3 96.9 / 53.6
    -> 95.9 / 30.2; seed 8 97.8 / 51.6 -> 96.8 / 46.4; before the ledger's reference used the
    two-way prior, 95.0 / 17.6 and 95.3 / 29.1, nearer the promise's edge)."""
    catalog = load_catalog(Settings().catalog_file)
    for seed in (5, 3):
        tasks = _subjects(3000, seed)
        res = {scope: {r.name: r for r in evaluate(tasks, catalog, q=0.95, prompt_signal=False,
                                                   quality_scope=scope)}
               for scope in ("type", "price")}
        per_type, price = res["type"]["router"], res["price"]["router"]
        frontier = res["type"]["all-frontier"]
        assert price.cost_usd < 0.75 * per_type.cost_usd, (seed, price.cost_usd,
                                                          per_type.cost_usd)
        # q over all types, from a cold start: within half a point of 0.95 x all-frontier
        assert price.success_rate >= 0.945 * frontier.success_rate, (seed, price.success_rate)


def test_the_router_process_routes_by_price_when_the_setting_says_so() -> None:
    """FLEETPLANE_ROUTER_QUALITY_SCOPE=price: the router built from settings decides by the
    price of a success, and the decision's reason says so."""
    from fleetplane.core import events as ev
    from fleetplane.router.main import build_router

    router = build_router(Settings(router_quality_scope="price", router_shared_state=False,
                                   router_prompt_signal=False))
    models = sorted(router.catalog.models)
    for i in range(60):  # outcomes of pinned tasks: every model has evidence
        model = models[i % len(models)]
        spec = ev.TaskSpec(name="w", task_type="summarize", prompt=f"warm {i}",
                           model_preference="pinned", model=model)
        router.handle(ev.TaskAccepted(task_id=f"w{i}", team="payments", spec=spec))
        router.handle(ev.TaskCompleted(task_id=f"w{i}", team="payments", attempt=1,
                                       model=model, output="ok", cost_usd=0.001,
                                       duration_ms=1))
    spec = ev.TaskSpec(name="b", task_type="summarize", prompt="sum up the report")
    (out,) = router.handle(ev.TaskAccepted(task_id="b1", team="payments", spec=spec))
    assert isinstance(out, ev.TaskRouted)
    assert out.model in models
    assert "per success, which keeps success >= q 0.95" in out.reason


def test_the_price_scope_converges_to_the_cheap_model_and_moves_when_it_degrades() -> None:
    """One task type, five models (the per-type scope's world in test_router_objective): the
    price settles on the cheapest model meeting q x best, and when that model degrades the
    ledger's deficit raises the price until the next one takes over."""
    import random
    from collections import Counter

    from fleetplane.router.policy import PolicyConfig
    from tests.unit.test_router_objective import run_world

    cfg = PolicyConfig(quality_scope="price")
    world = {"fleet-local-coder": 0.3, "gpt-4o-mini": 0.92, "claude-haiku-4-5": 0.93,
             "claude-sonnet-4-6": 0.94, "claude-opus-4-7": 0.95}
    rng = random.Random(3)
    stats = OutcomeStats()
    tail = run_world(stats, world, 1500, "a", rng, q=0.9, cfg=cfg)[-500:]
    picks = Counter(m for m, _ in tail)
    assert picks["gpt-4o-mini"] >= 0.8 * len(tail), picks  # measured 435 of 500
    assert sum(ok for _, ok in tail) / len(tail) >= 0.855 - 0.03
    world["gpt-4o-mini"] = 0.5
    picks = Counter(m for m, _ in run_world(stats, world, 1500, "b", rng, q=0.9,
                                            cfg=cfg)[-300:])
    assert picks["claude-haiku-4-5"] >= 0.6 * 300, picks  # measured 214 of 300
    assert picks["gpt-4o-mini"] < 0.3 * 300, picks
    assert sum(world[m] * n for m, n in picks.items()) / 300 >= 0.855 - 0.03


def test_a_deficit_caps_the_price() -> None:
    """A deficit of hundreds of successes (every outcome a failure) raises the price to at most
    PRICE_CAP x the start (was e^50 x: $1.3e13 per success), so the pick still weighs costs."""
    from fleetplane.router.price import PRICE_CAP

    stats = OutcomeStats()
    _record(stats, "qa", "big", 90, 100, 1.0)
    _record(stats, "qa", "small", 0, 400, 0.1)
    pr = success_price(stats, 0.95, 0.0)
    assert pr.owed > 300
    assert pr.price <= PRICE_CAP * 1.0 / START_GAIN * (1 + 1e-9)


def test_the_prompt_models_skill_tells_predictive_prompts_from_noise() -> None:
    """PromptSignal.skill: the prompt model's squared error against the pair's success rate,
    each prediction made before its outcome was learned. Where the prompt decides the outcome
    (river prompts succeed, mountain prompts fail) it is far above the price scope's bar; where
    outcomes are coin flips whatever the prompt, below it; with too few outcomes, None."""
    import random

    from fleetplane.router.features import FeatureCache, HashingEmbedder
    from fleetplane.router.policy import PolicyConfig
    from fleetplane.router.signal import PromptSignal

    features = FeatureCache(HashingEmbedder())
    signal = PromptSignal()
    rng = random.Random(3)
    for i in range(400):
        topic = rng.choice(["river", "mountain"])
        x = features.vector(f"s{i}", f"Tell me about the {topic} number {rng.randint(1, 50)}")
        signal.update("m", "topic", x, topic == "river")
        signal.update("m", "coin", x, rng.random() < 0.5)
        if i == 10:
            assert signal.skill("m", "topic") is None  # too few outcomes to tell
    bar = PolicyConfig().price_prompt_skill
    topic_skill, coin_skill = signal.skill("m", "topic"), signal.skill("m", "coin")
    assert topic_skill is not None and topic_skill > 2 * bar
    assert coin_skill is not None and coin_skill < bar
    assert signal.skill("m", "never-seen") is not None  # judged over all task types


def test_an_unseen_task_type_borrows_from_similar_prompts_through_the_skill() -> None:
    """The router's own path (the prompt view carries PromptSignal.skill): on a task type no
    model has run, a model's prediction counts when the prompt features alone (no task type's
    bias) predicted its outcomes better than its success rate over all types. gpt-4o-mini does
    translations and fails arithmetic, the local coder the other way round: a new translation
    type goes to the first, an arithmetic prompt of the same new type to the second."""
    import random

    from fleetplane.core.catalog import Catalog
    from fleetplane.core.events import TaskSpec
    from fleetplane.router.features import FeatureCache, HashingEmbedder
    from fleetplane.router.policy import PolicyConfig, PromptView, choose
    from fleetplane.router.signal import PromptSignal

    features = FeatureCache(HashingEmbedder())
    signal = PromptSignal()
    stats = OutcomeStats()
    rng = random.Random(1)
    words = ["house", "river", "friend", "window", "garden", "letter", "music", "winter"]
    names = ["gpt-4o-mini", "fleet-local-coder"]
    for i in range(300):
        if i % 2:
            task_type, good = "translate-fr", "gpt-4o-mini"
            prompt = f"Translate to French: the {rng.choice(words)} and the {rng.choice(words)}"
        else:
            task_type, good = "arithmetic", "fleet-local-coder"
            prompt = f"Compute {rng.randint(10, 99)} * {rng.randint(10, 99)} + {rng.randint(1, 9)}"
        x = features.vector(f"train-{i}", prompt)
        for model in names:
            signal.update(model, task_type, x, model == good)
            stats.record(task_type, model, model == good, 0.001)
    cat = load_catalog(Settings().catalog_file)
    small = Catalog(tiers=cat.tiers, default_tier="small", task_types={},
                    models={n: cat.models[n] for n in names})
    picked = {}
    for key, prompt in (("de", "Translate to German: the river and the garden"),
                        ("calc", "Compute 12 * 40 + 3")):
        x = features.vector(key, prompt)
        view = PromptView(signal.predict_many(names, "translate-de", x), None,
                          {m: signal.skill(m, "translate-de") for m in names})
        assert view.skill is not None
        assert all((k or 0.0) >= PolicyConfig().price_prompt_skill for k in view.skill.values())
        picked[key] = choose(small, TaskSpec(name="n", task_type="translate-de", prompt=prompt),
                             stats, key=f"{key}/1", cfg=PolicyConfig(exploration_share=0.0),
                             prompt=view).model.name
    assert picked == {"de": "gpt-4o-mini", "calc": "fleet-local-coder"}
