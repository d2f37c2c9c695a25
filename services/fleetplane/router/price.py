"""The price scope: one price of a success over all task types, held by the success ledger (pure).

With `PolicyConfig.quality_scope = "price"`, q x the best model's success is promised for the
router's decisions as a whole (as with "pooled"), but no per-type target is solved for: every
decision picks the model with the largest value `price x P(success) - cost` (a Lagrangian pick,
per prompt where the prompt signal speaks), and one number, the price of a success in USD, is
held by the ledger over all task types' recent outcomes:

    owed  = sum over types of (q x the type's best model's success x its recent volume
            - its recent successes)
    price = start x exp(owed / max(H_MIN, H_SCALE x sqrt(volume)))

A deficit raises the price (dearer, better models win more decisions, on the types where a
success is cheapest first); a surplus lowers it, so the successes that the cheap models' work
leaves over the promise pay for exploring them. The start is what pays the dearest model's cost
for a 20-point gain in success: a cold start routes to the best-looking model until a surplus
exists (the ledger settles where the price has moved from the start to the price the fleet's
models need, so a start far above it leaves a surplus of H x log(start / price) successes).
The scale H of the exponent grows with the square root of the volume, the scale of the
ledger's noise (docs/routing.md, "Price of a success").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

from fleetplane.router.stats import REFERENCE_MIN_EVIDENCE, OutcomeStats

START_GAIN = 0.2  # the start price pays the dearest model's cost for this gain in success
H_MIN = 3.0  # successes of deficit per e-fold of the price, at least
H_SCALE = 0.3  # ... and this x sqrt(the window's volume)
PRICE_CAP = 100.0  # the price is at most this x the start
ANCHOR_CAP = 10.0  # the anchor raises the price by at most this factor
INTEGRAL_GAIN = 0.01  # per outcome, the anchor moves by this x the ledger's level (0: off)
REFERENCE_SHARE = 0.05  # decisions that go to the model most plausibly best (its estimate)


@dataclass(frozen=True)
class Ledger:
    best_volume: float  # sum over types of the best model's success x the type's volume
    successes: float  # recent successes over all types
    volume: float  # recent outcomes over all types
    dearest: float  # the largest mean observed cost of a model (USD), 0 before any


def best_success(stats: OutcomeStats, task_type: str, strength: float = 0.0) -> float | None:
    """The type's best model's success: the largest posterior mean among the models with
    REFERENCE_MIN_EVIDENCE recent outcomes (the largest of noisy means is biased up, which
    errs on the side of the promise). With `strength` > 0 the posterior is the policy's:
    `strength` pseudo-outcomes at the two-way prior's mean (fleetplane.router.prior), not
    Beta(1, 1), whose pull towards 0.5 put the reference of a type with few outcomes of its
    best model below that model's success (a type at 0.9 with 5 outcomes: 0.86), so the
    promise fell short of q x best (docs/routing.md, "Price of a success")."""
    out = None
    for model in stats.models_of(task_type):
        s = stats.get(task_type, model)
        n = s.recent_successes + s.recent_failures
        if n < REFERENCE_MIN_EVIDENCE:
            continue
        pi = stats.prior(task_type, model) if strength > 0 else None
        mean = s.mean if pi is None else (strength * pi + s.recent_successes + 0.5) / (
            strength + n + 1.0)
        out = mean if out is None else max(out, mean)
    return out


def ledger(stats: OutcomeStats, strength: float = 0.0) -> Ledger:
    """The ledger's sums, cached by the statistics' version (one pass over types x models)."""
    key = ("price-ledger", strength)
    got = stats.memo.get(key)
    if got is not None:
        version, cached = cast(tuple[int, Ledger], got)
        if version == stats.version:
            return cached
    best = succ = vol = 0.0
    for task_type in stats.task_types():
        ref = best_success(stats, task_type, strength)
        t = stats.of_type(task_type)
        n = t.recent_successes + t.recent_failures
        if ref is None or n <= 0:
            continue
        best += ref * n
        succ += t.recent_successes
        vol += n
    dearest = max((s.mean_cost_usd or 0.0 for _, s in stats.items()), default=0.0)
    out = Ledger(best, succ, vol, dearest)
    stats.memo[key] = (stats.version, out)
    return out


@dataclass(frozen=True)
class Price:
    price: float  # USD per success
    owed: float  # successes short of q x best over the recent outcomes (negative: ahead)


def success_price(stats: OutcomeStats, q: float, dearest_now: float,
                  strength: float = 0.0) -> Price:
    """The price of a success for a decision at quality share q. `dearest_now`: the dearest
    capable model's estimated cost for this task (the start, before any cost is observed);
    `strength`: the two-way prior's pseudo-outcomes in the references (see best_success)."""
    led = ledger(stats, strength)
    start = max(led.dearest, dearest_now, 1e-9) / START_GAIN
    owed = q * led.best_volume - led.successes
    scale = max(H_MIN, H_SCALE * math.sqrt(led.volume))
    level = owed / scale
    if INTEGRAL_GAIN > 0:
        # the anchor: the integral of the ledger's level over the outcomes, so the ledger
        # settles at 0 rather than where start x exp(level) happens to be the price the models
        # need (H x log(needed / start) successes short when the start is below it)
        key = ("price-anchor", q, strength)
        got = stats.memo.get(key)
        version, anchor = cast(tuple[int, float], got) if got is not None else (0, 0.0)
        if stats.version > version:
            if abs(level) < 1.0:  # near the ledger's balance only: a cold start's deficit
                # (tens of successes) must not wind the anchor up
                anchor = min(math.log(ANCHOR_CAP), max(0.0, anchor + INTEGRAL_GAIN * level
                                                       * (stats.version - version)))
            stats.memo[key] = (stats.version, anchor)
        level += anchor
    # capped: at PRICE_CAP x the start, the dearest model is worth paying for a gain in
    # success of START_GAIN / PRICE_CAP (0.2 points): any larger deficit changes nothing more
    return Price(start * math.exp(min(math.log(PRICE_CAP), level)), owed)
