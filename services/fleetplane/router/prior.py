"""The shared prior of P(success | task type, model): a two-way logit model (pure).

    logit P(success | t, m) = a[t] + b[m]

fitted to the outcome counts of every (task type, model) pair seen so far (a rank-one matrix
factorisation of the success table, in logit space, ridge-regularised towards 0). It is what
one pair borrows from all the others: a model that is weak on the task types it ran starts low
on a new one, and a task type on which every model does well starts high for a model that has
not run it yet. The per-pair posterior (policy._estimates) starts from this prior with a
few pseudo-outcomes and is then moved by the pair's own outcomes, so a real interaction (a
model good at arithmetic, poor at code) wins over the prior within tens of outcomes.

The fit is a few rounds of one-dimensional Newton steps per coefficient (a table of task types
x models cells; warm-started from the previous fit), repeated lazily after new outcomes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

RIDGE = 1.0  # pull of each coefficient towards 0, in units of Fisher information (outcomes)
ROUNDS = 3  # Newton rounds per refit (warm-started: a few are enough)
EB_MIN_OUTCOMES = 10  # a pair's outcomes before its residual counts for the prior's strength
EB_MIN_PAIRS = 6  # pairs (over at least two task types) before the strength is estimated
EB_STRENGTH = (2.0, 200.0)  # the estimated strength is clamped to this range


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


class TwoWayPrior:
    def __init__(self) -> None:
        self.type_effect: dict[str, float] = {}
        self.model_effect: dict[str, float] = {}
        self._rows: list[tuple[str, str, float, float]] = []  # the cells of the last fit
        self._strength: tuple[float | None] | None = None  # computed on demand, per fit

    def fit(self, cells: Iterable[tuple[str, str, float, float]], rounds: int = ROUNDS) -> None:
        """`cells`: (task type, model, successes, attempts), attempts > 0."""
        rows = [c for c in cells if c[3] > 0]
        for t, m, _, _ in rows:
            self.type_effect.setdefault(t, 0.0)
            self.model_effect.setdefault(m, 0.0)
        for _ in range(rounds):
            for effects, key in ((self.type_effect, 0), (self.model_effect, 1)):
                grad: dict[str, float] = dict.fromkeys(effects, 0.0)
                info: dict[str, float] = dict.fromkeys(effects, RIDGE)
                for row in rows:
                    t, m, s, n = row
                    p = _sigmoid(self.type_effect[t] + self.model_effect[m])
                    k = row[key]
                    assert isinstance(k, str)
                    grad[k] += s - n * p
                    info[k] += n * p * (1 - p)
                for k in effects:
                    step = (grad[k] - RIDGE * effects[k]) / info[k]
                    effects[k] += max(-2.0, min(2.0, step))
        self._rows, self._strength = rows, None

    @property
    def strength(self) -> float | None:
        """Empirical Bayes: the pseudo-outcomes the prior is worth, from how far the pairs'
        success rates lie from it beyond their binomial noise (None: too few pairs yet).
        Computed once per fit, when asked."""
        if self._strength is None:
            self._strength = (self._estimate_strength(self._rows),)
        return self._strength[0]

    def _estimate_strength(self, rows: list[tuple[str, str, float, float]]) -> float | None:
        """Method of moments: the pairs' squared deviations from the prior (per residual
        degree of freedom: the fit spent one per task type and model) less their binomial
        noise are the interaction's variance tau^2; a Beta prior of that variance around a
        mean pi is worth pi (1 - pi) / tau^2 - 1 pseudo-outcomes."""
        squares = noise = spread = 0.0
        types: set[str] = set()
        models: set[str] = set()
        pairs = 0
        for t, m, s, n in rows:
            if n < EB_MIN_OUTCOMES:
                continue
            pi = _sigmoid(self.type_effect[t] + self.model_effect[m])
            v = pi * (1 - pi)
            squares += (s / n - pi) ** 2
            noise += v / n
            spread += v
            pairs += 1
            types.add(t)
            models.add(m)
        dof = pairs - (len(types) + len(models) - 1)
        if dof < EB_MIN_PAIRS or len(types) < 2:
            return None
        tau2 = max(squares / dof - noise / pairs, 1e-6)
        lo, hi = EB_STRENGTH
        return max(lo, min(hi, (spread / pairs) / tau2 - 1))

    def predict(self, task_type: str, model: str) -> float | None:
        """The prior mean of P(success), or None when the model has no outcomes at all."""
        b = self.model_effect.get(model)
        if b is None:
            return None
        a = self.type_effect.get(task_type)
        if a is None:  # an unseen task type: the average task type
            a = (sum(self.type_effect.values()) / len(self.type_effect)
                 if self.type_effect else 0.0)
        return _sigmoid(a + b)
