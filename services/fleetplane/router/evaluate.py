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
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

from fleetplane.core.catalog import Catalog, Model, Prices, load_catalog
from fleetplane.core.events import TaskSpec
from fleetplane.core.settings import Settings
from fleetplane.router.policy import CHARS_PER_TOKEN, PolicyConfig, Unroutable, choose
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

    def add(self, model: str, obs: Observation) -> None:
        self.tasks += 1
        self.successes += obs.success
        self.cost_usd += obs.cost_usd
        self.picks[model] = self.picks.get(model, 0) + 1

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
    return TaskSpec(name="eval", task_type=task.task_type,
                    prompt="x" * (task.prompt_tokens * CHARS_PER_TOKEN),
                    allowed_tools=["read_file"] if task.tools else [])


def _by_tier(cat: Catalog, tiers: Iterable[str]) -> str:
    """The default (else cheapest) candidate of the first tier in `tiers` that has one."""
    for tier in tiers:
        pool = [m for m in cat.models.values() if m.tier == tier]
        if pool:
            return cat.default_model(tier).name
    raise AssertionError("a task without candidates")


def evaluate(tasks: list[EvalTask], catalog: Catalog, *, seed: int = 0,
             exploration_share: float = 0.1) -> list[Result]:
    cfg = PolicyConfig(exploration_share=exploration_share)
    stats = OutcomeStats()
    rng = random.Random(seed)
    results = {n: Result(n) for n in ("router", "task-type tiers", "all-frontier", "all-small",
                                      "random", "oracle")}

    def rules(cat: Catalog, task: EvalTask) -> str:
        policy = cat.task_types.get(task.task_type)
        tier = policy.tier if policy else cat.default_tier
        i = cat.tiers.index(tier)
        return _by_tier(cat, [*cat.tiers[i:], *reversed(cat.tiers[:i])])

    def oracle(cat: Catalog, task: EvalTask) -> str:
        ok = [(o.cost_usd, n) for n, o in task.candidates.items() if o.success]
        return min(ok)[1] if ok else min((o.cost_usd, n) for n, o in task.candidates.items())[1]

    baselines: dict[str, Callable[[Catalog, EvalTask], str]] = {
        "task-type tiers": rules,
        "all-frontier": lambda cat, t: _by_tier(cat, reversed(cat.tiers)),
        "all-small": lambda cat, t: _by_tier(cat, cat.tiers),
        "random": lambda cat, t: rng.choice(sorted(t.candidates)),
        "oracle": oracle,
    }
    for task in tasks:
        cat = task_catalog(catalog, task)
        spec = task_spec(task)
        try:
            picked = choose(cat, spec, stats, key=f"{task.task_id}/1", cfg=cfg).model.name
        except Unroutable:  # no candidate fits the task's capabilities: the oracle's choice
            picked = oracle(cat, task)
        obs = task.candidates[picked]
        results["router"].add(picked, obs)
        stats.record(task.task_type, picked, obs.success, obs.cost_usd)
        for name, pick in baselines.items():
            chosen = pick(cat, task)
            results[name].add(chosen, task.candidates[chosen])
    return list(results.values())


def table(results: list[Result], title: str) -> Table:
    frontier = next((r for r in results if r.name == "all-frontier"), None)
    t = Table(title=title)
    for col, justify in (("policy", "left"), ("tasks", "right"), ("success", "right"),
                         ("cost $", "right"), ("$ / task", "right"), ("$ / success", "right"),
                         ("cost vs frontier", "right"), ("most picked", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in results:
        per_success = f"{r.cost_usd / r.successes:.5f}" if r.successes else "-"
        vs = (f"{r.cost_usd / frontier.cost_usd:.0%}" if frontier and frontier.cost_usd
              else "-")
        top = sorted(r.picks.items(), key=lambda kv: -kv[1])[:2]
        t.add_row(r.name, str(r.tasks), f"{r.success_rate:.1%}", f"{r.cost_usd:.4f}",
                  f"{r.cost_usd / r.tasks:.5f}" if r.tasks else "-", per_success, vs,
                  ", ".join(f"{m} {n}" for m, n in top))
    return t


def run(path: Path, *, seed: int = 0, exploration_share: float = 0.1, as_json: bool = False,
        catalog_file: Path | None = None, console: Console | None = None) -> int:
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    catalog = load_catalog(catalog_file or Settings().catalog_file)
    try:
        tasks = load_tasks(path, catalog)
    except EvalFileError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        return 2
    results = evaluate(tasks, catalog, seed=seed, exploration_share=exploration_share)
    if as_json:
        print(json.dumps([{"policy": r.name, "tasks": r.tasks, "success_rate": r.success_rate,
                           "cost_usd": r.cost_usd, "picks": r.picks} for r in results]))
    else:
        console.print(table(results, f"routing evaluation: {path.name}, {len(tasks)} tasks "
                                     f"(exploration {exploration_share:.0%}, seed {seed})"))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleetplane.router.evaluate",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("file", type=Path)
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--exploration-share", type=float, default=0.1)
    p.add_argument("--json", action="store_true", help="figures as JSON instead of a table")
    args = p.parse_args(argv)
    return run(args.file, seed=args.seed, exploration_share=args.exploration_share,
               as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
