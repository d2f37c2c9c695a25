"""Offline evaluation of the router: replay logged tasks against baselines.

    python -m fleetplane.router.evaluate FILE.jsonl [--seed N] [--exploration-share S] [--json]
    fleetplane route eval FILE.jsonl

FILE.jsonl holds one task per line (docs/routing.md, "Evaluation file"):

    {"task_id": "t1", "task_type": "codegen", "prompt_tokens": 900, "tools": true,
     "candidates": {"claude-haiku-4-5": {"success": false, "cost_usd": 0.004},
                    "claude-sonnet-4-6": {"success": true, "cost_usd": 0.013, "tier": "standard"}}}

For every task, each candidate model's observed success and cost. The router replays the tasks in
file order with the real policy (fleetplane.router.policy.choose) and learns only from what it
chose (bandit feedback: the outcome of its own pick), as it would in production. Baselines:
all-frontier, all-small, the task-type tiers without learning, uniform random, and the oracle
(the cheapest candidate that succeeded). Models missing from the catalog need a "tier".
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

from fleetplane.core.catalog import Catalog, Model, Prices, load_catalog
from fleetplane.core.events import TaskSpec
from fleetplane.core.settings import Settings
from fleetplane.router.features import FeatureCache, load_embedder
from fleetplane.router.objective import DEFAULT_QUALITY_SHARE
from fleetplane.router.policy import (
    CHARS_PER_TOKEN,
    QUALITY_SCOPES,
    RECENT_PROMPTS,
    PolicyConfig,
    Unroutable,
    choose,
    prompt_view,
)
from fleetplane.router.semantic_eval import KindResult, semantic_pairs
from fleetplane.router.signal import PromptSignal, RecentPredictions
from fleetplane.router.stats import OutcomeStats


class Observation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    success: bool
    cost_usd: float = Field(ge=0)
    tier: str | None = None


class EvalTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(min_length=1)
    task_type: str = Field(min_length=1)
    team: str = "eval"
    prompt_tokens: int = Field(default=500, ge=1, le=10_000_000)
    tools: bool = False
    prompt: str | None = None
    candidates: dict[str, Observation] = Field(min_length=1)


class EvalFileError(ValueError):
    """A malformed evaluation file: every problem, each with its line and field."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:20]
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path}: {len(problems)} malformed line(s):\n  " + "\n  ".join(shown)
                         + more)


def load_tasks(path: Path, catalog: Catalog) -> list[EvalTask]:
    problems: list[str] = []
    tasks: list[EvalTask] = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalFileError(path, [f"cannot read the file: {exc}"]) from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {n}: not JSON ({exc.msg} at column {exc.colno})")
            continue
        try:
            task = EvalTask.model_validate(raw)
        except ValidationError as exc:
            for e in exc.errors():
                loc = ".".join(str(p) for p in e["loc"]) or "(line)"
                problems.append(f"line {n}: {loc}: {e['msg']}")
            continue
        for name, obs in task.candidates.items():
            tier = obs.tier or (catalog.models[name].tier if name in catalog.models else None)
            if tier is None:
                problems.append(f"line {n}: candidates.{name}: not in the catalog; give its "
                                f"\"tier\" ({', '.join(catalog.tiers)})")
            elif tier not in catalog.tiers:
                problems.append(f"line {n}: candidates.{name}.tier: {tier!r} is not one of "
                                f"{catalog.tiers}")
        tasks.append(task)
    if not tasks and not problems:
        problems.append("no tasks in the file")
    if problems:
        raise EvalFileError(path, problems)
    return tasks


# -- replay ------------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    tasks: int = 0
    successes: int = 0
    cost_usd: float = 0.0
    picks: dict[str, int] = field(default_factory=dict)
    by_type: dict[str, list[float]] = field(default_factory=dict)  # type -> [n, ok, cost]

    def add(self, model: str, obs: Observation, task_type: str = "") -> None:
        self.tasks += 1
        self.successes += obs.success
        self.cost_usd += obs.cost_usd
        self.picks[model] = self.picks.get(model, 0) + 1
        t = self.by_type.setdefault(task_type, [0.0, 0.0, 0.0])
        t[0] += 1
        t[1] += obs.success
        t[2] += obs.cost_usd

    @property
    def success_rate(self) -> float:
        return self.successes / self.tasks if self.tasks else 0.0


def _model_for(catalog: Catalog, name: str, obs: Observation) -> Model:
    known = catalog.models.get(name)
    if known is not None:
        return replace(known, tier=obs.tier) if obs.tier else known
    assert obs.tier is not None
    return Model(name=name, tier=obs.tier, provider="eval", prices=Prices(0, 0, 0, 0),
                 context_window=10_000_000, tool_use=True)


def task_catalog(catalog: Catalog, task: EvalTask) -> Catalog:
    """The catalog restricted to the task's candidates (the router can only pick those)."""
    models = {n: _model_for(catalog, n, o) for n, o in task.candidates.items()}
    return Catalog(tiers=catalog.tiers, default_tier=catalog.default_tier, models=models,
                   task_types=catalog.task_types)


def task_spec(task: EvalTask) -> TaskSpec:
    prompt = task.prompt or ""
    pad = max(0, task.prompt_tokens * CHARS_PER_TOKEN - len(prompt))
    return TaskSpec(name="eval", task_type=task.task_type, prompt=prompt + " " * pad,
                    allowed_tools=["read_file"] if task.tools else [])


def _by_tier(cat: Catalog, tiers: Iterable[str]) -> str:
    """The default (else cheapest) candidate of the first tier in `tiers` that has one."""
    for tier in tiers:
        pool = [m for m in cat.models.values() if m.tier == tier]
        if pool:
            return cat.default_model(tier).name
    raise AssertionError("a task without candidates")


@dataclass(frozen=True)
class RouterConfig:
    """How the evaluated router runs (defaults: the production router's)."""

    q: float = DEFAULT_QUALITY_SHARE
    exploration_share: float = 1.0
    prompt_signal: bool = True
    embedding: str = "wordllama"
    confidence_z: float = PolicyConfig.confidence_z
    shortfall_gain: float = PolicyConfig.shortfall_gain
    signal_weight: float = PolicyConfig.signal_weight
    best_from_samples: bool = PolicyConfig.best_from_samples
    shortfall_recent: bool = PolicyConfig.shortfall_recent
    prior_strength: float = PolicyConfig.prior_strength
    sampled_per_decision: int = PolicyConfig.sampled_per_decision
    play_contender: bool = PolicyConfig.play_contender
    ledger: bool = PolicyConfig.ledger
    quality_scope: str = PolicyConfig.quality_scope


def prompt_vectors(tasks: list[EvalTask], embedding: str) -> FeatureCache | None:
    """Every prompt's features, embedded in one batch (the router caches them per task)."""
    with_prompt = [(t.task_id, t.prompt) for t in tasks if t.prompt]
    if not with_prompt:
        return None
    cache = FeatureCache(load_embedder(embedding), max_entries=len(with_prompt) + 1)
    for i in range(0, len(with_prompt), 512):
        cache.vectors(with_prompt[i:i + 512])
    return cache


def replay_router(tasks: list[EvalTask], catalog: Catalog, rc: RouterConfig,
                  features: FeatureCache | None = None) -> Result:
    """The router over the tasks in order, learning only from its own picks (bandit feedback)."""
    cfg = PolicyConfig(exploration_share=rc.exploration_share, confidence_z=rc.confidence_z,
                       shortfall_gain=rc.shortfall_gain, signal_weight=rc.signal_weight,
                       best_from_samples=rc.best_from_samples,
                       shortfall_recent=rc.shortfall_recent, prior_strength=rc.prior_strength,
                       sampled_per_decision=rc.sampled_per_decision,
                       play_contender=rc.play_contender, ledger=rc.ledger,
                       quality_scope=rc.quality_scope)
    stats = OutcomeStats()
    signal = PromptSignal()
    recent: dict[str, RecentPredictions] = {}  # task type -> recent prompts' predictions
    res = Result("router")
    for task in tasks:
        cat = task_catalog(catalog, task)
        spec = task_spec(task)
        x = (features.vector(task.task_id, task.prompt)
             if rc.prompt_signal and features is not None and task.prompt else None)
        seen = recent.get(task.task_type)
        if seen is None:
            seen = recent[task.task_type] = RecentPredictions(RECENT_PROMPTS)
        view = (prompt_view(signal, cat.models, task.task_type, x, seen)
                if x is not None else None)
        try:
            picked = choose(cat, spec, stats, key=f"{task.task_id}/1", cfg=cfg, q=rc.q,
                            prompt=view).model.name
        except Unroutable:  # no candidate fits the task's capabilities: the oracle's choice
            picked = _oracle(task)
        obs = task.candidates[picked]
        res.add(picked, obs, task.task_type)
        stats.record(task.task_type, picked, obs.success, obs.cost_usd)
        if x is not None:
            signal.update(picked, task.task_type, x, obs.success)
    return res


def _oracle(task: EvalTask) -> str:
    ok = [(o.cost_usd, n) for n, o in task.candidates.items() if o.success]
    return min(ok)[1] if ok else min((o.cost_usd, n) for n, o in task.candidates.items())[1]


def hindsight_static(tasks: list[EvalTask], q: float) -> dict[str, str]:
    """Per task type, the cheapest single model whose success over the whole file (known in
    hindsight) is at least q x the type's best model's."""
    agg: dict[str, dict[str, list[float]]] = {}
    for t in tasks:
        for name, o in t.candidates.items():
            a = agg.setdefault(t.task_type, {}).setdefault(name, [0.0, 0.0, 0.0])
            a[0] += 1
            a[1] += o.success
            a[2] += o.cost_usd
    choice = {}
    for tt, models in agg.items():
        rate = {m: v[1] / v[0] for m, v in models.items()}
        best = max(rate.values())
        choice[tt] = min((v[2] / v[0], m) for m, v in models.items()
                         if rate[m] >= q * best)[1]
    return choice


def evaluate(tasks: list[EvalTask], catalog: Catalog, *, seed: int = 0,
             exploration_share: float = 1.0, q: float = DEFAULT_QUALITY_SHARE,
             prompt_signal: bool = True, embedding: str = "wordllama",
             features: FeatureCache | None = None,
             quality_scope: str = PolicyConfig.quality_scope) -> list[Result]:
    rng = random.Random(seed)
    rc = RouterConfig(q=q, exploration_share=exploration_share, prompt_signal=prompt_signal,
                      embedding=embedding, quality_scope=quality_scope)
    if features is None and prompt_signal:
        features = prompt_vectors(tasks, embedding)
    results = {"router": replay_router(tasks, catalog, rc, features)}
    static = hindsight_static(tasks, q)

    def rules(cat: Catalog, task: EvalTask) -> str:
        policy = cat.task_types.get(task.task_type)
        tier = policy.tier if policy else cat.default_tier
        i = cat.tiers.index(tier)
        return _by_tier(cat, [*cat.tiers[i:], *reversed(cat.tiers[:i])])

    baselines: dict[str, Callable[[Catalog, EvalTask], str]] = {
        "task-type tiers": rules,
        "all-frontier": lambda cat, t: _by_tier(cat, reversed(cat.tiers)),
        "all-small": lambda cat, t: _by_tier(cat, cat.tiers),
        "random": lambda cat, t: rng.choice(sorted(t.candidates)),
        f"hindsight per-type (q {q:.2f})": lambda cat, t: (
            static[t.task_type] if static[t.task_type] in t.candidates else _oracle(t)),
        "oracle": lambda cat, t: _oracle(t),
    }
    for name in baselines:
        results[name] = Result(name)
    for task in tasks:
        cat = task_catalog(catalog, task)
        for name, pick in baselines.items():
            chosen = pick(cat, task)
            results[name].add(chosen, task.candidates[chosen], task.task_type)
    singles = single_models(tasks)
    router = results["router"]
    affordable = [r for r in singles if r.cost_usd <= router.cost_usd * 1.0001]
    if affordable:
        best = max(affordable, key=lambda r: (r.success_rate, -r.cost_usd))
        results["best single at <= cost"] = replace(best, name=f"best single <= cost: {best.name}")
    return list(results.values())


def single_models(tasks: list[EvalTask]) -> list[Result]:
    """Every model that is a candidate of every task, used for all of them."""
    common = set.intersection(*(set(t.candidates) for t in tasks)) if tasks else set()
    out = []
    for name in sorted(common):
        r = Result(name)
        for t in tasks:
            r.add(name, t.candidates[name], t.task_type)
        out.append(r)
    return out


# -- the cost-success curve ----------------------------------------------------------------------
QS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99, 1.0)


@dataclass(frozen=True)
class CurvePoint:
    q: float
    success_rate: float
    cost_usd: float


@dataclass(frozen=True)
class Curve:
    points: list[CurvePoint]
    frontier: Result
    cheapest: Result  # the cheapest single model over the file

    def pgr(self, p: CurvePoint) -> float:
        """Performance gap recovered: 0 at the cheapest model's success, 1 at the frontier's."""
        gap = self.frontier.success_rate - self.cheapest.success_rate
        return (p.success_rate - self.cheapest.success_rate) / gap if gap > 0 else 1.0

    def cost_share(self, p: CurvePoint) -> float:
        return p.cost_usd / self.frontier.cost_usd if self.frontier.cost_usd else 0.0

    def cost_at_pgr(self, level: float) -> float | None:
        """Cost (share of all-frontier) of the cheapest curve point recovering `level` of the gap,
        interpolated linearly between points; None if no point reaches it."""
        pts = sorted((self.cost_share(p), self.pgr(p)) for p in self.points)
        pts = [(0.0, 0.0), *pts] if pts and pts[0][1] >= 0 else pts
        for (c0, g0), (c1, g1) in pairwise(pts):
            if g1 >= level > g0:
                return c0 + (c1 - c0) * (level - g0) / (g1 - g0)
        return next((c for c, g in pts if g >= level), None)

    def average_pgr(self) -> float:
        """The mean PGR of the curve's points (RouteLLM's APGR over the q grid)."""
        return sum(self.pgr(p) for p in self.points) / len(self.points) if self.points else 0.0


def curve(tasks: list[EvalTask], catalog: Catalog, *, qs: Iterable[float] = QS,
          exploration_share: float = 1.0, prompt_signal: bool = True,
          embedding: str = "wordllama", features: FeatureCache | None = None,
          quality_scope: str = PolicyConfig.quality_scope) -> Curve:
    if features is None and prompt_signal:
        features = prompt_vectors(tasks, embedding)
    points = []
    for q in qs:
        rc = RouterConfig(q=q, exploration_share=exploration_share, prompt_signal=prompt_signal,
                          embedding=embedding, quality_scope=quality_scope)
        r = replay_router(tasks, catalog, rc, features)
        points.append(CurvePoint(q, r.success_rate, r.cost_usd))
    frontier = Result("all-frontier")
    for t in tasks:
        cat = task_catalog(catalog, t)
        name = _by_tier(cat, reversed(cat.tiers))
        frontier.add(name, t.candidates[name], t.task_type)
    singles = single_models(tasks) or [frontier]
    cheapest = min(singles, key=lambda r: r.cost_usd)
    return Curve(points, frontier, cheapest)


def table(results: list[Result], title: str) -> Table:
    frontier = next((r for r in results if r.name == "all-frontier"), None)
    t = Table(title=title)
    for col, justify in (("policy", "left"), ("tasks", "right"), ("success", "right"),
                         ("success vs frontier", "right"), ("cost $", "right"),
                         ("$ / success", "right"), ("cost vs frontier", "right"),
                         ("most picked", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in results:
        per_success = f"{r.cost_usd / r.successes:.5f}" if r.successes else "-"
        vs = (f"{r.cost_usd / frontier.cost_usd:.0%}" if frontier and frontier.cost_usd
              else "-")
        svs = (f"{r.success_rate / frontier.success_rate:.1%}"
               if frontier and frontier.success_rate else "-")
        top = sorted(r.picks.items(), key=lambda kv: -kv[1])[:2]
        t.add_row(r.name, str(r.tasks), f"{r.success_rate:.1%}", svs, f"{r.cost_usd:.4f}",
                  per_success, vs, ", ".join(f"{m} {n}" for m, n in top))
    return t


def type_table(results: list[Result]) -> Table:
    """Per task type: each policy's success and cost as shares of all-frontier's."""
    frontier = next(r for r in results if r.name == "all-frontier")
    t = Table(title="per task type (success / cost, as % of all-frontier on that type)")
    t.add_column("policy")
    types = sorted(frontier.by_type)
    for tt in types:
        n = int(frontier.by_type[tt][0])
        t.add_column(f"{tt} ({n})", justify="right")
    for r in results:
        row = [r.name]
        for tt in types:
            f, x = frontier.by_type[tt], r.by_type.get(tt, [0.0, 0.0, 0.0])
            row.append(f"{x[1] / f[1]:.0%} / {x[2] / f[2]:.0%}" if f[1] and f[2] else "-")
        t.add_row(*row)
    return t


def curve_table(c: Curve) -> Table:
    t = Table(title="cost-success curve over q (router, online, cold start)")
    for col in ("q", "success", "success vs frontier", "cost vs frontier", "gap recovered"):
        t.add_column(col, justify="right")
    for p in c.points:
        t.add_row(f"{p.q:.2f}", f"{p.success_rate:.1%}",
                  f"{p.success_rate / c.frontier.success_rate:.1%}",
                  f"{c.cost_share(p):.0%}", f"{c.pgr(p):.0%}")
    return t


def curve_summary(c: Curve) -> dict[str, float | str | None]:
    return {"cheapest_model": c.cheapest.name, "cheapest_success": c.cheapest.success_rate,
            "frontier_success": c.frontier.success_rate,
            "cost_at_50pct_gap": c.cost_at_pgr(0.5), "cost_at_80pct_gap": c.cost_at_pgr(0.8),
            "average_gap_recovered": c.average_pgr()}


def _result_json(r: Result) -> dict[str, object]:
    return {"policy": r.name, "tasks": r.tasks, "success_rate": r.success_rate,
            "cost_usd": r.cost_usd, "picks": r.picks,
            "by_type": {t: {"tasks": int(v[0]), "success_rate": v[1] / v[0] if v[0] else 0.0,
                            "cost_usd": v[2]} for t, v in sorted(r.by_type.items())}}


def run(path: Path, *, seed: int = 0, exploration_share: float = 1.0, as_json: bool = False,
        catalog_file: Path | None = None, console: Console | None = None,
        q: float = DEFAULT_QUALITY_SHARE, with_curve: bool = True, prompt_signal: bool = True,
        embedding: str = "wordllama", with_semantic: bool = True,
        semantic_threshold: float = 0.97, semantic_max_edits: int = 0,
        quality_scope: str = PolicyConfig.quality_scope) -> int:
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    if embedding not in ("wordllama", "hashing"):
        Console(stderr=True).print(f"error: --embedding: {embedding!r} is not wordllama or "
                                   f"hashing", highlight=False)
        return 2
    if quality_scope not in QUALITY_SCOPES:
        Console(stderr=True).print(f"error: --quality-scope: {quality_scope!r} is not one of "
                                   f"{', '.join(QUALITY_SCOPES)}", highlight=False)
        return 2
    catalog = load_catalog(catalog_file or Settings().catalog_file)
    try:
        tasks = load_tasks(path, catalog)
    except EvalFileError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        return 2
    features = prompt_vectors(tasks, embedding) if prompt_signal else None
    results = evaluate(tasks, catalog, seed=seed, exploration_share=exploration_share, q=q,
                       prompt_signal=prompt_signal, embedding=embedding, features=features,
                       quality_scope=quality_scope)
    c = (curve(tasks, catalog, exploration_share=exploration_share, prompt_signal=prompt_signal,
               embedding=embedding, features=features, quality_scope=quality_scope)
         if with_curve else None)
    semantic = None
    if with_semantic:
        with_prompts = [(t.task_type, t.prompt) for t in tasks if t.prompt]
        if with_prompts:
            sem_features = features or FeatureCache(load_embedder(embedding),
                                                    max_entries=16 * 200 + 1)
            semantic = semantic_pairs(with_prompts, sem_features, threshold=semantic_threshold,
                                      max_edits=semantic_max_edits, seed=seed)
    if as_json:
        out: dict[str, object] = {"results": [_result_json(r) for r in results], "curve": [],
                                  "summary": {}, "semantic_cache": [
            {"kind": k.kind, "must_hit": k.must_hit, "pairs": k.pairs, "hits": k.hits}
            for k in semantic or []]}
        if c is not None:
            out["curve"] = [{"q": p.q, "success_rate": p.success_rate, "cost_usd": p.cost_usd,
                             "cost_vs_frontier": c.cost_share(p), "gap_recovered": c.pgr(p)}
                            for p in c.points]
            out["summary"] = curve_summary(c)
        print(json.dumps(out))
        return 0
    signal = (f"prompt signal {features.embedder.name}" if features is not None
              else "no prompt signal")
    console.print(table(results, f"routing evaluation: {path.name}, {len(tasks)} tasks (q {q:.2f}, "
                                 f"Thompson share {exploration_share:.0%}, {signal}, seed {seed})"))
    console.print(type_table(results))
    if c is not None:
        console.print(curve_table(c))
        s = curve_summary(c)

        def share(v: object) -> str:
            return f"{v:.0%}" if isinstance(v, float) else "not reached"
        console.print(f"gap = {c.frontier.name} {c.frontier.success_rate:.1%} minus cheapest "
                      f"single model {c.cheapest.name} {c.cheapest.success_rate:.1%}; cost at 50% "
                      f"of the gap: {share(s['cost_at_50pct_gap'])} of all-frontier, at 80%: "
                      f"{share(s['cost_at_80pct_gap'])}; average gap recovered over the curve: "
                      f"{share(s['average_gap_recovered'])}", highlight=False)
    if semantic is not None:
        console.print(semantic_table(semantic, semantic_threshold, semantic_max_edits))
    return 0


def semantic_table(kinds: list[KindResult], threshold: float, max_edits: int) -> Table:
    t = Table(title=f"semantic cache on pairs from the file's prompts (threshold {threshold:.2f},"
                    f" max word edits {max_edits})")
    for col in ("pair", "should hit", "pairs", "answered from cache", "rate"):
        t.add_column(col, justify="left" if col == "pair" else "right")
    for k in kinds:
        label = "false hits" if not k.must_hit else "hits"
        t.add_row(k.kind, "yes" if k.must_hit else "no (near miss)", str(k.pairs),
                  f"{k.hits} {label}", f"{k.rate:.1%}")
    misses = [k for k in kinds if not k.must_hit]
    total, bad = sum(k.pairs for k in misses), sum(k.hits for k in misses)
    t.caption = (f"false-hit rate on near misses: {bad}/{total} = "
                 f"{bad / total if total else 0:.2%}")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleetplane.router.evaluate",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("file", type=Path)
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--q", type=float, default=DEFAULT_QUALITY_SHARE,
                   help="quality share: success >= q x the best model's")
    p.add_argument("--exploration-share", type=float, default=1.0,
                   help="share of decisions judged by Thompson samples instead of estimates")
    p.add_argument("--no-curve", action="store_true", help="skip the curve over q")
    p.add_argument("--no-prompt-signal", action="store_true",
                   help="ignore prompts: per task type statistics only")
    p.add_argument("--embedding", choices=("wordllama", "hashing"), default="wordllama")
    p.add_argument("--json", action="store_true", help="figures as JSON instead of tables")
    p.add_argument("--no-semantic", action="store_true",
                   help="skip the semantic cache's near-miss measurement")
    p.add_argument("--semantic-threshold", type=float, default=0.97)
    p.add_argument("--semantic-max-edits", type=int, default=0)
    p.add_argument("--quality-scope", choices=QUALITY_SCOPES, default=PolicyConfig.quality_scope,
                   help="type: q x best per task type; pooled: over all task types together "
                        "(docs/routing.md, 'Pooled accounting'); price: over all task types, "
                        "held by one price of a success ('Price of a success')")
    args = p.parse_args(argv)
    if not 0.0 <= args.q <= 1.0:
        p.error("--q must be in [0, 1]")
    return run(args.file, seed=args.seed, exploration_share=args.exploration_share,
               as_json=args.json, q=args.q, with_curve=not args.no_curve,
               prompt_signal=not args.no_prompt_signal, embedding=args.embedding,
               with_semantic=not args.no_semantic, semantic_threshold=args.semantic_threshold,
               semantic_max_edits=args.semantic_max_edits, quality_scope=args.quality_scope)


if __name__ == "__main__":
    sys.exit(main())
