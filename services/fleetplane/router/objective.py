"""The routing objective (pure): lowest expected cost subject to success >= q x the best model's.

For one decision the router knows, per capable model, an estimate of its success probability
(for this prompt) and of its cost. The constraint's right-hand side is q times the best of those
estimates: the router does not need an absolute quality target, it compares models with each
other. The cheapest policy that meets it in expectation is a mixture of at most two models (a
linear program over the lower convex hull of the (success, cost) points): either the cheapest
model that meets the target on its own, or a cheaper model that does not, mixed with a dearer
one that does, in the proportion that meets the target exactly. `solve` returns that mixture;
the caller draws from it with a deterministic uniform number, so the same task attempt always
gets the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_QUALITY_SHARE = 0.95


@dataclass(frozen=True)
class Option:
    name: str
    success: float  # estimated P(success) for this task
    cost: float  # estimated cost of one attempt, USD


@dataclass(frozen=True)
class Mixture:
    """`upper` meets the target; `lower` (cheaper, below it) is used with probability
    1 - upper_share. A single model: lower is None and upper_share is 1."""

    upper: Option
    lower: Option | None
    upper_share: float
    target: float
    best: Option

    @property
    def expected_cost(self) -> float:
        lo = self.lower.cost if self.lower else 0.0
        return self.upper_share * self.upper.cost + (1 - self.upper_share) * lo

    @property
    def expected_success(self) -> float:
        lo = self.lower.success if self.lower else 0.0
        return self.upper_share * self.upper.success + (1 - self.upper_share) * lo

    def pick(self, u: float) -> Option:
        """The model for a uniform draw `u` in [0, 1)."""
        if self.lower is None or u < self.upper_share:
            return self.upper
        return self.lower


def solve(options: list[Option], q: float) -> Mixture:
    """The cheapest mixture whose expected success is at least q x the best option's success
    (q in [0, 1]; the best option always meets its own target, so there is always a solution)."""
    if not options:
        raise ValueError("no options")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    best = max(options, key=lambda o: (o.success, -o.cost, o.name))
    target = q * best.success
    meets = [o for o in options if o.success >= target]
    single = min(meets, key=lambda o: (o.cost, -o.success, o.name))
    result = Mixture(single, None, 1.0, target, best)
    for lo in options:
        if lo.success >= target or lo.cost >= single.cost:
            continue
        for hi in meets:
            if hi.cost <= lo.cost or hi.success <= lo.success:
                continue
            share = (target - lo.success) / (hi.success - lo.success)
            mix = Mixture(hi, lo, share, target, best)
            if mix.expected_cost < result.expected_cost - 1e-15:
                result = mix
    return result
