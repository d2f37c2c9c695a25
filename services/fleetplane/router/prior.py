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


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


class TwoWayPrior:
    def __init__(self) -> None:
        self.type_effect: dict[str, float] = {}
        self.model_effect: dict[str, float] = {}

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
