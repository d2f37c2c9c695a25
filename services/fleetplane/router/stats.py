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
REFERENCE_MIN_EVIDENCE = 5  # outcomes before a model can be a type's reference
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

    def add(self, successes: int, failures: int, cost_usd: float, recent_successes: float,
            recent_failures: float) -> None:
        """Add counts (negative to take them away): another replica's contribution."""
        self.successes += successes
        self.failures += failures
        self.cost_usd += cost_usd
        self.recent_successes = max(0.0, self.recent_successes + recent_successes)
        self.recent_failures = max(0.0, self.recent_failures + recent_failures)
        n = self.recent_successes + self.recent_failures
        if n > WINDOW:  # the sum of several replicas' windows weighs about one window
            self.recent_successes *= WINDOW / n
            self.recent_failures *= WINDOW / n

    def cell(self) -> tuple[int, int, float, float, float]:
        return (self.successes, self.failures, self.cost_usd, self.recent_successes,
                self.recent_failures)

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


Cell = tuple[int, int, float, float, float]  # successes, failures, cost, recent s, recent f


class OutcomeStats:
    """Statistics for every (task type, model) seen; unseen pairs read as the prior.

    With several router replicas (fleetplane.router.shared), each one records the outcomes it
    consumes (`record`, its own contribution, kept apart in `own` for publishing) and sets the
    other replicas' latest published contributions (`set_peer`); every query reads the sum."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], ModelStats] = {}
        self._by_model: dict[str, ModelStats] = {}
        self._by_type: dict[str, ModelStats] = {}
        self._recent: dict[str, float] = {}  # task type -> success rate, moving average
        self._prior = TwoWayPrior()
        self.own: dict[tuple[str, str], ModelStats] = {}  # this replica's contribution
        self.dirty: set[tuple[str, str]] = set()  # own cells changed since last published
        self._peers: dict[tuple[str, str, str], Cell] = {}  # (replica, type, model) -> cell
        self._unfitted = 0  # outcomes recorded since the prior was last fitted
        self._models_of: dict[str, set[str]] = {}  # task type -> models with outcomes
        self.version = 0  # counts changes: what is derived from the statistics is cached by it
        self.memo: dict[object, object] = {}  # key -> (version, a value derived from the stats)

    def get(self, task_type: str, model: str) -> ModelStats:
        return self._by_key.get((task_type, model)) or ModelStats()

    def record(self, task_type: str, model: str, success: bool, cost_usd: float) -> None:
        self.own.setdefault((task_type, model), ModelStats()).record(success, cost_usd)
        self.dirty.add((task_type, model))
        self._by_key.setdefault((task_type, model), ModelStats()).record(success, cost_usd)
        self._by_model.setdefault(model, ModelStats()).record(success, cost_usd)
        self._by_type.setdefault(task_type, ModelStats()).record(success, cost_usd)
        self._models_of.setdefault(task_type, set()).add(model)
        n = self._by_type[task_type].attempts
        ema = self._recent.get(task_type, 0.0)
        self._recent[task_type] = ema + ((1.0 if success else 0.0) - ema) / min(n, RECENT)
        self._unfitted += 1
        self.version += 1

    def set_peer(self, replica: str, task_type: str, model: str, cell: Cell) -> None:
        """Another replica's latest contribution to a cell (its absolute counts; idempotent,
        and an older value after a newer one only moves the sum back until the next one)."""
        old = self._peers.get((replica, task_type, model), (0, 0, 0.0, 0.0, 0.0))
        delta = (cell[0] - old[0], cell[1] - old[1], cell[2] - old[2], cell[3] - old[3],
                 cell[4] - old[4])
        if not any(delta):
            return
        self._peers[(replica, task_type, model)] = cell
        self._add_to_sums(task_type, model, delta)

    def restore_own(self, task_type: str, model: str, cell: Cell) -> None:
        """This replica's own contribution as it last published it (start-up from the shared
        state topic instead of the history)."""
        old = self.own.get((task_type, model))
        prev = old.cell() if old else (0, 0, 0.0, 0.0, 0.0)
        own = self.own.setdefault((task_type, model), ModelStats())
        delta = (cell[0] - prev[0], cell[1] - prev[1], cell[2] - prev[2], cell[3] - prev[3],
                 cell[4] - prev[4])
        own.add(*delta)
        self._add_to_sums(task_type, model, delta)

    def _add_to_sums(self, task_type: str, model: str, delta: Cell) -> None:
        for stats in (self._by_key.setdefault((task_type, model), ModelStats()),
                      self._by_model.setdefault(model, ModelStats()),
                      self._by_type.setdefault(task_type, ModelStats())):
            stats.add(*delta)
        self._models_of.setdefault(task_type, set()).add(model)
        n = delta[0] + delta[1]
        if n > 0:  # the type's recent rate moves towards the new outcomes' rate
            ema = self._recent.get(task_type, 0.0)
            total = max(1, self._by_type[task_type].attempts)
            self._recent[task_type] = ema + (delta[0] / n - ema) * min(1.0, n / min(total,
                                                                                      RECENT))
        self._unfitted += max(1, n)
        self.version += 1

    def reference(self, task_type: str) -> float | None:
        """The task type's best model's success as the statistics say now: the posterior mean
        (Beta(1, 1) plus the recent outcomes) of the model with the largest lower bound (mean
        less one standard deviation) among those with at least REFERENCE_MIN_EVIDENCE outcomes."""
        best: tuple[float, float] | None = None
        for model in self._models_of.get(task_type, ()):
            s = self._by_key[(task_type, model)]
            if s.recent_successes + s.recent_failures < REFERENCE_MIN_EVIDENCE:
                continue
            key = (s.mean - s.std, s.mean)
            if best is None or key > best:
                best = key
        return None if best is None else best[1]

    def models_of(self, task_type: str) -> list[str]:
        return sorted(self._models_of.get(task_type, ()))

    def replicas(self) -> set[str]:
        return {r for r, _, _ in self._peers}

    def prior(self, task_type: str, model: str) -> float | None:
        """The two-way prior of P(success) for the pair (fleetplane.router.prior), refitted
        lazily: after every outcome on small tables, every len/8 outcomes on large ones."""
        if self._unfitted and self._unfitted >= len(self._by_key) // 8:
            self._prior.fit((t, m, s.recent_successes, s.recent_successes + s.recent_failures)
                            for (t, m), s in self._by_key.items())
            self._unfitted = 0
        return self._prior.predict(task_type, model)

    def prior_strength(self) -> float | None:
        """The two-way prior's worth in pseudo-outcomes, estimated from the table (empirical
        Bayes; fleetplane.router.prior), or None while too few pairs have outcomes."""
        return self._prior.strength

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
