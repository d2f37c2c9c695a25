"""Generate a synthetic routing-evaluation file (the shape fleetplane.router.evaluate reads).

    python -m fleetplane.router.evalgen --tasks 500 --seed 7 > examples/routing-eval.jsonl

The world it simulates: each task has a hidden difficulty d ~ U(0, 1); a model succeeds when d is
below its skill for the task type (plus a little noise), so a task a small model solves is
usually solved by stronger ones too. Skills grow with the tier and shrink with how hard the task
type is (its catalog tier). Costs are the catalog's prices times the task's tokens and turns:
an agent task spends several model calls. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

from fleetplane.core.catalog import load_catalog
from fleetplane.core.settings import Settings

#: Skill of a model tier (rows) on task types of a tier (columns): the success probability.
SKILL = {
    "small": {"small": 0.92, "standard": 0.72, "frontier": 0.35},
    "standard": {"small": 0.96, "standard": 0.88, "frontier": 0.80},
    "frontier": {"small": 0.98, "standard": 0.95, "frontier": 0.86},
}
#: Per-model adjustment inside a tier (a weaker cheap model, a stronger one).
ADJUST = {"fleet-local-coder": -0.12, "gpt-4o-mini": -0.03}


def generate(n: int, seed: int) -> list[dict[str, object]]:
    catalog = load_catalog(Settings().catalog_file)
    rng = random.Random(seed)
    types = sorted(catalog.task_types)
    out = []
    for i in range(n):
        task_type = rng.choice(types)
        type_tier = catalog.task_types[task_type].tier
        tools = rng.random() < 0.3
        prompt_tokens = int(rng.lognormvariate(6.5, 0.8))  # median ~660 tokens
        turns = rng.randint(1, 4) if tools else 1
        output_tokens = rng.randint(150, 900)
        difficulty = rng.random()
        candidates: dict[str, dict[str, object]] = {}
        for model in catalog.models.values():
            if tools and not model.tool_use:
                continue
            if prompt_tokens + output_tokens > model.context_window:
                continue
            skill = SKILL[model.tier][type_tier] + ADJUST.get(model.name, 0.0)
            success = difficulty + rng.gauss(0, 0.05) < skill
            p = model.prices
            cost = turns * (prompt_tokens * p.input + output_tokens * p.output)
            candidates[model.name] = {"success": success, "cost_usd": round(cost, 7)}
        out.append({"task_id": f"eval-{seed}-{i:05d}", "task_type": task_type,
                    "prompt_tokens": prompt_tokens, "tools": tools, "candidates": candidates})
    return out


#: the two models of the "subjects" world (a cheap one and a frontier one)
CHEAP, FRONTIER = "mixtral-8x7b-chat", "gpt-4-1106-preview"
GAPS = (0.0, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25)  # the cheap model's relative shortfall, drawn


def generate_subjects(n: int, seed: int, types: int = 58, gaps: tuple[float, ...] = GAPS,
                      nested: bool = True) -> list[dict[str, object]]:
    """Two models and many task types (like a benchmark of subjects): per type, the frontier
    model's success rate p ~ U(0.55, 0.97) and the cheap model's p x (1 - gap x U(0.5, 1.5)),
    the gap drawn from GAPS (on about 3 types in 7 the cheap model is within 95%); type
    frequencies log-normal; outcomes nested through a hidden difficulty (or, with nested=False,
    drawn independently per model: the cheap model may answer what the frontier one misses);
    the cheap model costs about 6% of the frontier model's."""
    rng = random.Random(seed)
    world = []
    for i in range(types):
        pb = rng.uniform(0.55, 0.97)
        pa = max(0.05, pb - rng.choice(gaps) * pb * rng.uniform(0.5, 1.5))
        world.append((f"subject-{i:02d}", pa, pb, rng.lognormvariate(0, 1)))
    weights = [w for *_, w in world]
    out: list[dict[str, object]] = []
    for k in range(n):
        name, pa, pb, _ = rng.choices(world, weights)[0]
        d = rng.random()
        d_b = d if nested else rng.random()
        tokens = rng.randint(100, 1500)
        out.append({"task_id": f"subj-{seed}-{k:05d}", "task_type": name, "prompt_tokens": tokens,
                    "candidates": {
                        CHEAP: {"success": d < pa, "cost_usd": round(tokens * 0.6e-6, 9),
                                "tier": "standard"},
                        FRONTIER: {"success": d_b < pb, "tier": "frontier", "cost_usd": round(
                            tokens * 10e-6 + 30e-6 * rng.randint(1, 50), 9)}}})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleetplane.router.evalgen")
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--world", choices=("catalog", "subjects"), default="catalog",
                   help="catalog: the catalog's models and task types; subjects: two models, "
                        "--types task types")
    p.add_argument("--types", type=int, default=58)
    p.add_argument("--gaps", default=",".join(f"{g:g}" for g in GAPS),
                   help="subjects: the cheap model's relative shortfalls to draw from, comma-"
                        "separated")
    p.add_argument("--independent", action="store_true",
                   help="subjects: the two models' outcomes are drawn independently, not nested")
    args = p.parse_args(argv)
    try:
        gaps = tuple(float(g) for g in args.gaps.split(","))
    except ValueError:
        p.error(f"--gaps: comma-separated numbers, got {args.gaps!r}")
    rows = (generate_subjects(args.tasks, args.seed, args.types, gaps, not args.independent)
            if args.world == "subjects"
            else generate(args.tasks, args.seed))
    for row in rows:
        sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
