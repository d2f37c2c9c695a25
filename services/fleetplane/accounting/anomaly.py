"""Anomalies against per-task-type baselines with a robust score (median and MAD).

For each task type and model the baseline is its last N finished attempts (a rolling window):
the router sends one task type to several models on purpose, and an attempt on a frontier model
costing 40 times the small model's is the router's choice, not an overrun. An attempt's cost,
tokens or duration is anomalous when its robust z-score ``0.6745 * (x - median) / MAD``
exceeds the threshold (3.5 by default, Iglewicz and Hoaglin) and the value is at least
`min_ratio` times the median (2 by default: a tight baseline makes a 10% difference score high,
and nobody acts on a 10% overrun); a duration must also exceed the median by
`min_duration_excess_ms` (10 s by default: sub-second attempts double under load alone).
The failure rate of the type's most recent attempts (the newest `recent` ones) is compared
with the failure rates of the earlier windows of the same length, scored the same way. With
MAD = 0 (identical values) a value that differs from the median by more than 50% of it counts
as infinitely far.
Pure functions: the publisher feeds them ClickHouse rows and turns anomalies into Alert events.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

METRICS = ("cost_usd", "tokens", "duration_ms")
K = 0.6745


@dataclass(frozen=True)
class Anomaly:
    task_type: str
    metric: str
    value: float
    baseline: float           # the median
    score: float
    task_id: str = ""
    team: str = ""
    attempt: int = 0
    model: str = ""

    @property
    def key(self) -> str:
        return f"{self.task_type}/{self.metric}/{self.task_id}/{self.attempt}"


def robust_z(value: float, sample: Sequence[float]) -> tuple[float, float]:
    """(score, median) of `value` against `sample`."""
    median = statistics.median(sample)
    mad = statistics.median(abs(x - median) for x in sample)
    if mad == 0:
        if abs(value - median) > 0.5 * abs(median) and value != median:
            return (float("inf") if value > median else float("-inf")), median
        return 0.0, median
    return K * (value - median) / mad, median


def attempt_anomalies(rows: Sequence[dict[str, Any]], *, new_ids: set[tuple[str, int]],
                      min_samples: int, threshold: float, min_ratio: float = 2.0,
                      min_duration_excess_ms: float = 10_000.0) -> list[Anomaly]:
    """Score each new attempt (task_id, attempt) against the other attempts of its task type
    and model in `rows` (the rolling window, any order; a row without "model" groups by type
    alone). Only high values alert (cost and time overruns), and only at `min_ratio` times the
    median or more."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task_type"], r.get("model") or ""), []).append(r)
    out = []
    for (task_type, model), items in groups.items():
        for r in items:
            if (r["task_id"], int(r["attempt"])) not in new_ids:
                continue
            others = [o for o in items if o is not r]
            if len(others) < min_samples:
                continue
            for metric in METRICS:
                sample = [float(o[metric] or 0) for o in others]
                value = float(r[metric] or 0)
                score, median = robust_z(value, sample)
                if metric == "duration_ms" and value - median < min_duration_excess_ms:
                    continue
                if score > threshold and value >= min_ratio * median:
                    out.append(Anomaly(task_type, metric, value, median, score,
                                       r["task_id"], r["team"], int(r["attempt"]), model))
    return out


def failure_rate_anomalies(rows: Sequence[dict[str, Any]], *, recent: int, min_windows: int,
                           threshold: float) -> list[Anomaly]:
    """Per task type: the failure rate of the newest `recent` attempts vs the rates of the
    earlier consecutive windows of the same size (rows of one type newest first)."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["occurred_at"], reverse=True):
        by_type.setdefault(r["task_type"], []).append(r)
    out = []
    for task_type, items in by_type.items():
        rates = [1 - sum(int(x["success"]) for x in items[i:i + recent]) / recent
                 for i in range(0, len(items) - recent + 1, recent)]
        if len(rates) < min_windows + 1:
            continue
        score, median = robust_z(rates[0], rates[1:])
        if score > threshold:
            newest = items[0]
            out.append(Anomaly(task_type, "failure_rate", rates[0], median, score,
                               newest["task_id"], "", int(newest["attempt"])))
    return out
