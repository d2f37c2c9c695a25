"""Outcome statistics per (task type, model): Beta posteriors of success and mean cost (pure).

Every counted attempt adds one success or one failure and its cost. The posterior of a model's
success rate for a task type is Beta(PRIOR_A + successes, PRIOR_B + failures); the router judges a
model by the posterior's conservative estimate (mean minus `z` standard deviations), and samples
from it when it explores (Thompson sampling).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from fleetplane.core import failures

PRIOR_A = 1.0
PRIOR_B = 1.0

#: Failure classes that say nothing about the model's quality (the attempt is not counted).
NEUTRAL_FAILURES = frozenset({
    failures.CONFLICT, failures.LOST_EXECUTOR, failures.BUDGET_EXCEEDED, failures.CANCELLED,
})


@dataclass
class ModelStats:
    successes: int = 0
    failures: int = 0
    cost_usd: float = 0.0  # summed over counted attempts

    @property
    def attempts(self) -> int:
        return self.successes + self.failures

    @property
    def alpha(self) -> float:
        return PRIOR_A + self.successes

    @property
    def beta(self) -> float:
        return PRIOR_B + self.failures

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def std(self) -> float:
        a, b = self.alpha, self.beta
        return math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))

    def lower(self, z: float) -> float:
        """A conservative estimate of the success rate: mean - z * std (z=0: the mean)."""
        return self.mean - z * self.std

    @property
    def mean_cost_usd(self) -> float | None:
        return self.cost_usd / self.attempts if self.attempts else None

    def sample(self, rng: random.Random) -> float:
        return rng.betavariate(self.alpha, self.beta)

    def record(self, success: bool, cost_usd: float) -> None:
        if success:
            self.successes += 1
        else:
            self.failures += 1
        self.cost_usd += max(0.0, cost_usd)


class OutcomeStats:
    """Statistics for every (task type, model) seen; unseen pairs read as the prior."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], ModelStats] = {}

    def get(self, task_type: str, model: str) -> ModelStats:
        return self._by_key.get((task_type, model)) or ModelStats()

    def record(self, task_type: str, model: str, success: bool, cost_usd: float) -> None:
        self._by_key.setdefault((task_type, model), ModelStats()).record(success, cost_usd)

    def items(self) -> list[tuple[tuple[str, str], ModelStats]]:
        return sorted(self._by_key.items())

    def __len__(self) -> int:
        return len(self._by_key)
