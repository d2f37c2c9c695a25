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
from fleetplane.router.prior import TwoWayPrior

PRIOR_A = 1.0
PRIOR_B = 1.0
RECENT = 300  # outcomes in the task type's recent success rate (moving average)
WINDOW = 500  # outcomes a (task type, model) posterior weighs, about (older ones discounted)

#: Failure classes that say nothing about the model's quality (the attempt is not counted).
NEUTRAL_FAILURES = frozenset({
    failures.CONFLICT, failures.LOST_EXECUTOR, failures.BUDGET_EXCEEDED, failures.CANCELLED,
})


@dataclass
class ModelStats:
    successes: int = 0
    failures: int = 0
    cost_usd: float = 0.0  # summed over counted attempts
    # the posterior's counts: the same outcomes, discounted so that they weigh about the last
    # WINDOW outcomes (a model whose quality changes is re-judged within a few hundred tasks)
    recent_successes: float = 0.0
    recent_failures: float = 0.0

    @property
    def attempts(self) -> int:
        return self.successes + self.failures

    @property
    def alpha(self) -> float:
        return PRIOR_A + self.recent_successes

    @property
    def beta(self) -> float:
        return PRIOR_B + self.recent_failures

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
        if self.recent_successes + self.recent_failures >= WINDOW - 1:
            keep = (WINDOW - 1) / WINDOW
            self.recent_successes *= keep
            self.recent_failures *= keep
        if success:
            self.successes += 1
            self.recent_successes += 1
        else:
            self.failures += 1
            self.recent_failures += 1
        self.cost_usd += max(0.0, cost_usd)


class OutcomeStats:
    """Statistics for every (task type, model) seen; unseen pairs read as the prior."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], ModelStats] = {}
        self._by_model: dict[str, ModelStats] = {}
        self._by_type: dict[str, ModelStats] = {}
        self._recent: dict[str, float] = {}  # task type -> success rate, moving average
        self._prior = TwoWayPrior()
        self._unfitted = 0  # outcomes recorded since the prior was last fitted

    def get(self, task_type: str, model: str) -> ModelStats:
        return self._by_key.get((task_type, model)) or ModelStats()

    def record(self, task_type: str, model: str, success: bool, cost_usd: float) -> None:
        self._by_key.setdefault((task_type, model), ModelStats()).record(success, cost_usd)
        self._by_model.setdefault(model, ModelStats()).record(success, cost_usd)
        self._by_type.setdefault(task_type, ModelStats()).record(success, cost_usd)
        n = self._by_type[task_type].attempts
        ema = self._recent.get(task_type, 0.0)
        self._recent[task_type] = ema + ((1.0 if success else 0.0) - ema) / min(n, RECENT)
        self._unfitted += 1

    def prior(self, task_type: str, model: str) -> float | None:
        """The two-way prior of P(success) for the pair (fleetplane.router.prior), refitted
        lazily: after every outcome on small tables, every len/8 outcomes on large ones."""
        if self._unfitted and self._unfitted >= len(self._by_key) // 8:
            self._prior.fit((t, m, s.recent_successes, s.recent_successes + s.recent_failures)
                            for (t, m), s in self._by_key.items())
            self._unfitted = 0
        return self._prior.predict(task_type, model)

    def overall(self, model: str) -> ModelStats:
        """The model's outcomes over every task type (for a type it has not run yet)."""
        return self._by_model.get(model) or ModelStats()

    def of_type(self, task_type: str) -> ModelStats:
        """Every counted outcome of the task type, whichever model ran it: the success the
        router's decisions actually achieved."""
        return self._by_type.get(task_type) or ModelStats()

    def recent_rate(self, task_type: str) -> float:
        """The task type's success rate over about the last RECENT outcomes (moving average)."""
        return self._recent.get(task_type, 0.0)

    def task_types(self) -> set[str]:
        return {t for t, _ in self._by_key}

    def items(self) -> list[tuple[tuple[str, str], ModelStats]]:
        return sorted(self._by_key.items())

    def __len__(self) -> int:
        return len(self._by_key)
