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
from bisect import bisect_left
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
    return _score(value, median, statistics.median(abs(x - median) for x in sample))


def _median_without(ordered: Sequence[float], value: float) -> float:
    """statistics.median of `ordered` (sorted, holding `value`, two or more items) with one
    occurrence of `value` left out, without building that list."""
    gap = bisect_left(ordered, value)
    n = len(ordered) - 1

    def at(i: int) -> float:
        return ordered[i] if i < gap else ordered[i + 1]

    if n % 2:
        return at(n // 2)
    return (at(n // 2 - 1) + at(n // 2)) / 2


class LeaveOneOut:
    """robust_z of each of a group's values against the others, equal to robust_z(value,
    the group without it) but after one sort: the median without one value is read off the
    sorted group, and takes at most three values over the group, so the deviations from it
    are sorted once per such median (stop 27: scoring a burst's 200 new attempts per type
    and model rebuilt and re-sorted the 200 others three times each, ~16% of accounting's
    CPU in a burst)."""

    def __init__(self, values: Sequence[float]) -> None:
        self.ordered = sorted(values)
        self._deviations: dict[float, list[float]] = {}

    def score(self, value: float) -> tuple[float, float]:
        """(score, median) of `value`, one of the group's values, against the others."""
        median = _median_without(self.ordered, value)
        deviations = self._deviations.get(median)
        if deviations is None:
            deviations = sorted(abs(x - median) for x in self.ordered)
            self._deviations[median] = deviations
        mad = _median_without(deviations, abs(value - median))
        return _score(value, median, mad)


def _score(value: float, median: float, mad: float) -> tuple[float, float]:
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
        if len(items) - 1 < max(min_samples, 1):
            continue  # too few others for any of them
        new = [r for r in items if (r["task_id"], int(r["attempt"])) in new_ids]
        if not new:
            continue
        baselines = {metric: LeaveOneOut([float(o[metric] or 0) for o in items])
                     for metric in METRICS}
        for r in new:
            for metric in METRICS:
                value = float(r[metric] or 0)
                score, median = baselines[metric].score(value)
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
