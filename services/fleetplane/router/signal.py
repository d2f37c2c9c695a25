"""P(success | prompt, model), learned online from outcomes (pure, numpy).

One logistic regression per model over the prompt's feature vector (fleetplane.router.features)
plus a bias per (model, task type):

    logit P = b[model] + t[model, task type] + w[model] . x

trained by one AdaGrad step per observed outcome (L2-regularised). A task type the model has
never run gets t = 0, so its prediction comes from the prompt alone: an unseen task type borrows
from the outcomes of similar prompts of other task types. The weights are small (262 floats per
model) and are part of the router's state snapshot (fleetplane.router.snapshot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fleetplane.router.features import DIM, Vector

LEARNING_RATE = 0.3
L2 = 1e-4
SKILL_DECAY = 0.995  # the skill's sums weigh about the last 200 outcomes of a (model, type)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


@dataclass
class ModelWeights:
    w: Vector = field(default_factory=lambda: np.zeros(DIM, dtype=np.float32))
    g2: Vector = field(default_factory=lambda: np.full(DIM, 1e-6, dtype=np.float32))
    bias: float = 0.0
    bias_g2: float = 1e-6
    by_type: dict[str, list[float]] = field(default_factory=dict)  # type -> [t, g2]
    updates: int = 0


class PromptSignal:
    def __init__(self) -> None:
        self.models: dict[str, ModelWeights] = {}
        # (model, task type) -> discounted [outcomes, successes, squared error of the prompt
        # model's prediction, squared error of the pair's running success rate], each
        # prediction made before its outcome was learned (prequential)
        self.scores: dict[tuple[str, str], list[float]] = {}
        # model -> the same sums for the prediction without the task type's bias against the
        # model's running success rate over all types (what an unseen type is judged by)
        self.model_scores: dict[str, list[float]] = {}

    def skill(self, model: str, task_type: str, min_outcomes: float = 50.0) -> float | None:
        """How much better the prompt model predicted the outcomes of (model, task type) than
        the pair's running success rate: 1 - its squared error / the rate's (a Brier skill
        score; 0: no better than the type's rate, negative: worse). A task type the model has
        fewer than `min_outcomes` outcomes of is judged by what such a type gets: the
        prediction without a task type's bias (the prompt's features alone) against the
        model's running success rate over all types, on all its outcomes; so an unseen task
        type borrows from similar prompts only where the prompts have predicted something.
        None: too few outcomes to tell."""
        own = self.scores.get((model, task_type))
        if own is None or own[0] < min_outcomes:
            own = self.model_scores.get(model)
        if own is None or own[0] < min_outcomes or own[3] <= 1e-9:
            return None
        return 1.0 - own[2] / own[3]

    def predict(self, model: str, task_type: str, x: Vector) -> float:
        m = self.models.get(model)
        if m is None:
            return 0.5
        t = m.by_type.get(task_type, (0.0, 0.0))[0]
        return _sigmoid(m.bias + t + float(m.w @ x))

    def predict_many(self, models: list[str], task_type: str, x: Vector) -> dict[str, float]:
        return {name: self.predict(name, task_type, x) for name in models}

    def update(self, model: str, task_type: str, x: Vector, success: bool) -> None:
        m = self.models.setdefault(model, ModelWeights())
        tb = m.by_type.setdefault(task_type, [0.0, 1e-6])
        p = _sigmoid(m.bias + tb[0] + float(m.w @ x))
        y = 1.0 if success else 0.0
        untyped = _sigmoid(m.bias + float(m.w @ x))
        for sc, pred in ((self.scores.setdefault((model, task_type), [0.0, 0.0, 0.0, 0.0]), p),
                         (self.model_scores.setdefault(model, [0.0, 0.0, 0.0, 0.0]), untyped)):
            rate = (sc[1] + 0.5) / (sc[0] + 1.0)
            sc[0] = SKILL_DECAY * sc[0] + 1.0
            sc[1] = SKILL_DECAY * sc[1] + y
            sc[2] = SKILL_DECAY * sc[2] + (y - pred) ** 2
            sc[3] = SKILL_DECAY * sc[3] + (y - rate) ** 2
        g = p - y
        grad = g * x + L2 * m.w
        m.g2 += grad * grad
        m.w -= (LEARNING_RATE / np.sqrt(m.g2)) * grad
        m.bias_g2 += g * g
        m.bias -= LEARNING_RATE / math.sqrt(m.bias_g2) * g
        tb[1] += g * g
        tb[0] -= LEARNING_RATE / math.sqrt(tb[1]) * g
        m.updates += 1


class RecentPredictions:
    """A task type's last `size` per-prompt predictions, a column per model (a numpy ring), so
    that a prompt's predicted gain of one model over another is ranked with a vector compare."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.cols: dict[str, int] = {}
        self.rows = np.full((size, 0), np.nan, dtype=np.float32)
        self.n = 0
        self.pos = 0

    def __len__(self) -> int:
        return self.n

    def add(self, predictions: dict[str, float]) -> None:
        new = [m for m in predictions if m not in self.cols]
        if new:
            for m in new:
                self.cols[m] = len(self.cols)
            pad = np.full((self.size, len(new)), np.nan, dtype=np.float32)
            self.rows = np.hstack([self.rows, pad])
        row = np.full(len(self.cols), np.nan, dtype=np.float32)
        for m, p in predictions.items():
            row[self.cols[m]] = p
        self.rows[self.pos] = row
        self.pos = (self.pos + 1) % self.size
        self.n = min(self.n + 1, self.size)

    def gains(self, upper: str, lower: str) -> Vector:
        """upper's predicted success minus lower's, over the recent prompts that have both."""
        i, j = self.cols.get(upper), self.cols.get(lower)
        if i is None or j is None:
            return np.zeros(0, dtype=np.float32)
        g = self.rows[:self.n, i] - self.rows[:self.n, j]
        out: Vector = g[~np.isnan(g)]
        return out
