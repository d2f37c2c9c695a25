"""The success promise kept over all task types together: one price of a success (pure).

With `PolicyConfig.quality_scope = "pooled"`, q x the best model's success is promised for the
router's decisions as a whole (each task type's q x its best model's success, weighted by the
type's recent volume), not for each task type on its own. The cheapest way to meet it is the
linear program over every task type's lower convex hull of (success, cost) points: buy the
success a target needs where it is cheapest, i.e. take the hull segments of all types in the
order of their price per success (cost gained / success gained) until the pooled target is met.
The price of the last segment is the fleet's price of a success; each task type's share of the
solution is a target success rate for that type, which the per-decision program then meets
(docs/routing.md, "Pooled accounting").

A task type may not fall below `floor` x its best model's success (the guard that keeps one type
from being sold off entirely for another's cheap successes).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from fleetplane.router.stats import OutcomeStats

MIN_EVIDENCE = 5.0  # a model's recent outcomes of a type before it is a point of the type's hull


@dataclass(frozen=True)
class TypeTarget:
    rate: float  # the success rate the pooled solution asks of this task type
    best: float  # the type's reference: its best model's success as the statistics say now
    price: float  # the fleet's price of one success (USD), the solution's last segment


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower-right convex hull from the cheapest point up to the most successful one:
    each next vertex is the one with the least cost per success gained."""
    cur = min(points, key=lambda pc: (pc[1], -pc[0]))
    out = [cur]
    while True:
        ahead = [pc for pc in points if pc[0] > cur[0] + 1e-12]
        if not ahead:
            return out
        cur = min(ahead, key=lambda pc: ((pc[1] - cur[1]) / (pc[0] - cur[0]), -pc[0]))
        out.append(cur)


def pooled_targets(stats: OutcomeStats, q: float, repay_horizon: float,
                   floor: float) -> dict[str, TypeTarget]:
    """Per task type with evidence, the success rate the pooled program asks of it."""
    hulls: dict[str, list[tuple[float, float]]] = {}
    volume: dict[str, float] = {}
    ref: dict[str, float] = {}
    need = owed = 0.0
    for task_type in sorted(stats.task_types()):
        pts = []
        for model in stats.models_of(task_type):
            s = stats.get(task_type, model)
            if s.recent_successes + s.recent_failures >= MIN_EVIDENCE and s.attempts:
                pts.append((s.mean, s.cost_usd / s.attempts))
        r = stats.reference(task_type)
        if not pts or r is None:
            continue
        t = stats.of_type(task_type)
        n = t.recent_successes + t.recent_failures
        hulls[task_type], volume[task_type], ref[task_type] = _hull(pts), n, r
        need += q * r * n
        owed += q * r * n - t.recent_successes
    if not hulls:
        return {}
    total = sum(volume.values())
    need += max(0.0, owed) / repay_horizon * total  # the deficit, repaid over the horizon
    # start every type at its floor (or its cheapest point, when that is above the floor)
    pos: dict[str, float] = {}
    got = 0.0
    segments: list[tuple[float, str, float, float]] = []  # (price, type, from p, to p)
    for tt, hull in hulls.items():
        lo = min(floor * ref[tt], hull[-1][0])
        start = max(hull[0][0], lo)
        pos[tt] = start
        got += volume[tt] * start
        for (p0, c0), (p1, c1) in pairwise(hull):
            if p1 <= start:
                continue
            segments.append(((c1 - c0) / (p1 - p0), tt, max(p0, start), p1))
    price = 0.0
    for seg_price, tt, p0, p1 in sorted(segments):
        if got >= need:
            break
        price = seg_price
        gain = volume[tt] * (p1 - p0)
        take = min(1.0, (need - got) / gain) if gain > 0 else 1.0
        pos[tt] = p0 + take * (p1 - p0)
        got += take * gain
    return {tt: TypeTarget(pos[tt], ref[tt], price) for tt in hulls}
