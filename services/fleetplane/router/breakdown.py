"""Where the router's cost goes: ledger, exploration and estimation against the hindsight mixture.

    python -m fleetplane.router.breakdown FILE.jsonl [--orders 4] [--q 0.95]

Replays the file through the real policy (prompt signal off, bandit feedback, cold start), in
file order and `--orders - 1` seeded shuffles. Every decision is taken three times on the same
statistics: as configured, without the success ledger, and without the ledger and without
exploring (the estimates alone); only the first one's outcome is learned from. The parts, as
shares of all-frontier's success / cost (mean over the orders):

* ledger: as configured minus without the ledger (what repaying the success deficit costs);
* exploration: without the ledger minus the estimates alone (Thompson draws and contenders);
* estimation: the estimates alone minus the hindsight mixture of the task type (the linear
  program on the type's whole-file success rates and costs: what a router that knew them would
  do), i.e. what imperfect estimates cost.

Rows: all tasks, the first 100 / next 200 / rest of each task type's tasks, each task type.
docs/routing.md ("Where the cost goes") has the development set's table.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from fleetplane.core.catalog import load_catalog
from fleetplane.core.settings import Settings
from fleetplane.router.evaluate import EvalTask, _by_tier, load_tasks, task_catalog, task_spec
from fleetplane.router.objective import DEFAULT_QUALITY_SHARE, Mixture, Option, solve
from fleetplane.router.policy import PolicyConfig, choose
from fleetplane.router.stats import OutcomeStats

PARTS = ("router", "hindsight", "ledger", "exploration", "estimation")


def hindsight_mixtures(tasks: list[EvalTask], q: float) -> dict[str, Mixture]:
    """Per task type, the cheapest mixture meeting q x the best, on whole-file rates."""
    agg: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for t in tasks:
        for name, o in t.candidates.items():
            a = agg[t.task_type].setdefault(name, [0.0, 0.0, 0.0])
            a[0] += 1
            a[1] += o.success
            a[2] += o.cost_usd
    return {tt: solve([Option(m, v[1] / v[0], v[2] / v[0]) for m, v in models.items()], q)
            for tt, models in agg.items()}


def _phase(i: int) -> str:
    return "first 100" if i < 100 else ("100-300" if i < 300 else "300+")


def breakdown(tasks: list[EvalTask], q: float, cfg: PolicyConfig,
              ) -> dict[tuple[str, str], dict[str, list[float]]]:
    """(task type or *, phase or *) -> part -> [success share, cost share] for one order."""
    catalog = load_catalog(Settings().catalog_file)
    mixtures = hindsight_mixtures(tasks, q)
    no_ledger = replace(cfg, ledger=False, shortfall_gain=0.0)
    estimates = replace(no_ledger, exploration_share=0.0)
    frontier_s = frontier_c = 0.0
    for t in tasks:
        o = t.candidates[_by_tier(task_catalog(catalog, t), reversed(catalog.tiers))]
        frontier_s += o.success
        frontier_c += o.cost_usd
    stats = OutcomeStats()
    seen: dict[str, int] = defaultdict(int)
    out: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(
        lambda: {p: [0.0, 0.0] for p in PARTS})
    for t in tasks:
        cat, spec, key = task_catalog(catalog, t), task_spec(t), f"{t.task_id}/1"
        picks = [choose(cat, spec, stats, key=key, cfg=c, q=q).model.name
                 for c in (cfg, no_ledger, estimates)]
        s = [float(t.candidates[m].success) for m in picks]
        c = [t.candidates[m].cost_usd for m in picks]
        mix = mixtures[t.task_type]
        parts = {"router": (s[0], c[0]), "hindsight": (mix.expected_success, mix.expected_cost),
                 "ledger": (s[0] - s[1], c[0] - c[1]),
                 "exploration": (s[1] - s[2], c[1] - c[2]),
                 "estimation": (s[2] - mix.expected_success, c[2] - mix.expected_cost)}
        phase = _phase(seen[t.task_type])
        seen[t.task_type] += 1
        for row in (("*", "*"), ("*", phase), (t.task_type, "*")):
            for part, (ds, dc) in parts.items():
                out[row][part][0] += ds / frontier_s
                out[row][part][1] += dc / frontier_c
        stats.record(t.task_type, picks[0], t.candidates[picks[0]].success,
                     t.candidates[picks[0]].cost_usd)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleetplane.router.breakdown")
    p.add_argument("file", type=Path)
    p.add_argument("--orders", type=int, default=4, help="file order plus seeded shuffles")
    p.add_argument("--q", type=float, default=DEFAULT_QUALITY_SHARE)
    args = p.parse_args(argv)
    tasks = load_tasks(args.file, load_catalog(Settings().catalog_file))
    runs = []
    for k in range(max(1, args.orders)):
        order = list(tasks)
        if k:
            random.Random(k).shuffle(order)
        runs.append(breakdown(order, args.q, PolicyConfig()))
    print(f"{args.file.name}: success / cost as % of all-frontier's, mean of {len(runs)} "
          f"order(s), q {args.q:.2f}, prompt signal off")
    print(f"{'rows':<28}" + "".join(f"{part:>18}" for part in PARTS))
    for row in sorted(runs[0], key=lambda r: (r[0] != "*", r)):
        cells = []
        for part in PARTS:
            s = sum(r[row][part][0] for r in runs) / len(runs)
            c = sum(r[row][part][1] for r in runs) / len(runs)
            sign = "+" if part in PARTS[2:] else ""
            cells.append(f"{100 * s:{sign}6.1f} /{100 * c:{sign}6.1f}")
        print(f"{row[0] + ', ' + row[1]:<28}" + "".join(f"{c:>18}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
