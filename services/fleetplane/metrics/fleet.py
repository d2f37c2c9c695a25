"""Fleet metrics from the event stream: counters and histograms a platform team alerts on.

They are kept as plain numbers and turned into Prometheus metric families when /metrics is
scraped (prometheus_client's custom-collector pattern), not as prometheus_client Counter and
Histogram children incremented per event: the accounting sink sees every event of the fleet on
one thread, and a child's `inc` / `observe` (a lock and a value object per call) with its
dedup window cost about 5 us per event there, a third of the sink's own work per record
(docs/accounting.md, "Sink, fourteenth round"). The exposition is the same: names, labels,
buckets; gauges (tasks running, quota) are computed at the scrape."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from fleetplane.core import events as ev
from fleetplane.core.bounded import Bounded
from fleetplane.core.logging import get_logger

log = get_logger(__name__)

#: submit -> finished, seconds: agent tasks take from seconds to hours
TASK_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)

FINISHED: dict[type[ev.Event], str] = {
    ev.TaskCompleted: "completed", ev.TaskFailed: "failed", ev.TaskAbandoned: "abandoned",
    ev.TaskCancelled: "cancelled", ev.TaskRolledBack: "rolled_back", ev.TaskRejected: "rejected",
}
#: FINISHED by event type name (TaskFailed with final=false is handled before it: retried)
FINISHED_NAMES: dict[str, str] = {cls.__name__: outcome for cls, outcome in FINISHED.items()}
#: the `kind` label of fleetplane_model_tokens and the ModelCall field it counts
TOKEN_FIELDS = (("input", "input_tokens"), ("output", "output_tokens"),
                ("cache_creation", "cache_creation_input_tokens"),
                ("cache_read", "cache_read_input_tokens"))

#: counters: name (exposed with _total) -> (help, label names)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fleetplane_events": ("Events seen, by type and team", ("type", "team")),
    "fleetplane_tasks_finished": ("Tasks that reached a terminal state, by outcome and team",
                                  ("outcome", "team")),
    "fleetplane_model_calls": ("Model calls, by model, team and outcome",
                               ("model", "team", "outcome")),
    "fleetplane_model_tokens": ("Tokens, by model, team and kind", ("model", "team", "kind")),
    "fleetplane_model_cost_usd": ("Provider-reported cost (USD), by model and team",
                                  ("model", "team")),
    "fleetplane_cache_hits": ("Tasks answered from the response cache, by team", ("team",)),
    "fleetplane_dead_letters": ("Records dead-lettered, by service and error class",
                                ("service", "error_class")),
}
#: histograms: name -> (help, label names, buckets)
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "fleetplane_task_duration_seconds": ("Submit to terminal, by outcome and team",
                                         ("outcome", "team"), TASK_BUCKETS),
    "fleetplane_model_call_seconds": ("Model call latency, by model", ("model",),
                                      CALL_BUCKETS),
}
RUNNING = ("fleetplane_tasks_running", "Tasks with an attempt running, by team")
QUOTA = ("fleetplane_team_running_quota", "A team's running quota (teams.yaml max_running)")

#: a bucket bound as prometheus_client's own histograms write its `le` label ("1.0")
go_string: Callable[[float], str] = floatToGoString

#: `FleetMetrics._ended` of a task in a terminal state: no attempt of it runs again
ENDED = float("inf")


class RecentIds:
    """The ids seen lately, for dropping redeliveries: between `limit`/2 and `limit` of the
    most recent are remembered (two sets, the older dropped whole when the newer fills), at a
    set lookup per id instead of an ordered map's move and trim."""

    def __init__(self, limit: int) -> None:
        self.half = max(1, limit // 2)
        self.new: set[str] = set()
        self.old: set[str] = set()

    def first_time(self, key: str) -> bool:
        """Whether `key` is new (and remember it)."""
        if key in self.new or key in self.old:
            return False
        self.new.add(key)
        if len(self.new) >= self.half:
            self.old, self.new = self.new, set()
        return True


class Buckets:
    """One label set's buckets (not cumulative; the last is +Inf) and sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.total = 0.0


class FleetMetrics(Collector):
    """`observe(event)` / `observe_batch` for every event the accounting service consumes.
    Redeliveries are not counted twice (recent event ids are remembered). `quota(team)` gives a
    team's running quota (teams.yaml) for the running-vs-quota gauge. Registered in
    `registry` (a new one by default) as a collector: the families are built at the scrape."""

    def __init__(self, quota: Callable[[str], int] | None = None,
                 registry: CollectorRegistry | None = None, memory: int = 200_000) -> None:
        self.quota = quota
        self._lock = threading.Lock()   # observe (the sink's thread) against collect (HTTP)
        self._counts: dict[str, dict[tuple[str, ...], float]] = {n: {} for n in COUNTERS}
        self._hists: dict[str, dict[tuple[str, ...], Buckets]] = {n: {} for n in HISTOGRAMS}
        self._seen = RecentIds(memory)
        self._submitted: Bounded[str, float] = Bounded(memory)
        # outcomes read before their submission (other topics, no order between them): the
        # duration is observed when the submission arrives
        self._ended_first: Bounded[str, tuple[str, str, float]] = Bounded(memory)
        self._running: dict[str, set[str]] = {}
        # per task, the last attempt that ended (ENDED for a terminal task): a TaskStarted
        # (tasks.lifecycle) read after its attempt's end (tasks.outcomes, no order between the
        # topics) does not count the task as running again (seen in the metrics e2e run)
        self._ended: Bounded[str, float] = Bounded(memory)
        self.registry = registry or CollectorRegistry()
        self.registry.register(self)

    # -- observing -------------------------------------------------------------------------
    def observe(self, event: ev.Event) -> None:
        """One event (the accounting's per-record path)."""
        self.observe_batch(((type(event).__name__, event.__dict__),))

    def observe_batch(self, events: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """Events as (type name, field dict), e.g. a sink batch's decoded records, without an
        event object each (pydantic's model_construct cost 8 us per event, more than the
        sink's own work on it)."""
        first_time = self._seen.first_time
        by_type = self._counts["fleetplane_events"]
        with self._lock:
            for name, d in events:
                try:
                    if not first_time(d["event_id"]):
                        continue
                    key = (name, d["team"])
                    by_type[key] = by_type.get(key, 0) + 1
                    if name in SPECIAL:
                        self._one(name, d)
                except Exception:  # a metric must never stop the sink: the event is stored
                    log.exception("fleet metrics: event not counted", event_type=name,
                                  task_id=d.get("task_id"))

    def _add(self, counter: str, labels: tuple[str, ...], amount: float) -> None:
        values = self._counts[counter]
        values[labels] = values.get(labels, 0) + amount

    def _observe(self, histogram: str, labels: tuple[str, ...], value: float) -> None:
        hists = self._hists[histogram]
        h = hists.get(labels)
        if h is None:
            h = hists[labels] = Buckets(len(HISTOGRAMS[histogram][2]))
        h.counts[bisect_left(HISTOGRAMS[histogram][2], value)] += 1
        h.total += value

    def _one(self, name: str, d: Mapping[str, Any]) -> None:
        team = d["team"]
        if name == "ModelCall":
            self._model_call(d)
        elif name == "TaskSubmitted":
            ended = self._ended_first.pop(d["task_id"], None)
            at = d["occurred_at"].timestamp()
            if ended is None:
                self._submitted.put(d["task_id"], at)
            else:
                outcome, team_of, end = ended
                self._observe("fleetplane_task_duration_seconds", (outcome, team_of),
                              max(0.0, end - at))
        elif name == "TaskStarted":
            if self._ended.get(d["task_id"], 0.0) < d["attempt"]:
                self._running.setdefault(team, set()).add(d["task_id"])
        elif name == "TaskFailed" and not d["final"]:
            # an attempt failed and the task is retried: not finished, no longer running
            task_id = d["task_id"]
            self._ended.put(task_id, max(self._ended.get(task_id, 0.0),
                                         float(d["attempt"])))
            self._running.setdefault(team, set()).discard(task_id)
        elif name in FINISHED_NAMES:
            self._ended.put(d["task_id"], ENDED)
            self._finish(name, d)
        elif name == "DeadLetter":
            self._add("fleetplane_dead_letters", (d["service"], d["error_class"]), 1)

    def _finish(self, name: str, d: Mapping[str, Any]) -> None:
        outcome, team, task_id = FINISHED_NAMES[name], d["team"], d["task_id"]
        at = d["occurred_at"].timestamp()
        self._add("fleetplane_tasks_finished", (outcome, team), 1)
        submitted = self._submitted.pop(task_id, None)
        if submitted is not None:
            self._observe("fleetplane_task_duration_seconds", (outcome, team),
                          max(0.0, at - submitted))
        else:
            self._ended_first.put(task_id, (outcome, team, at))
        if name == "TaskCompleted" and d["cached"]:
            self._add("fleetplane_cache_hits", (team,), 1)
        self._running.setdefault(team, set()).discard(task_id)

    def _model_call(self, d: Mapping[str, Any]) -> None:
        model, team = d["model"], d["team"]
        self._add("fleetplane_model_calls", (model, team, d["outcome"]), 1)
        for kind, field in TOKEN_FIELDS:
            n = d[field]
            if n:
                self._add("fleetplane_model_tokens", (model, team, kind), n)
        if d["cost_usd"] > 0:
            self._add("fleetplane_model_cost_usd", (model, team), d["cost_usd"])
        self._observe("fleetplane_model_call_seconds", (model,),
                      max(0.0, d["latency_ms"] / 1000))

    # -- the scrape ------------------------------------------------------------------------
    def describe(self) -> Iterator[Metric]:
        """The families without samples (the registry checks names at registration)."""
        for name, (doc, labels) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, labels=labels)
        for name, (doc, labels, _) in HISTOGRAMS.items():
            yield HistogramMetricFamily(name, doc, labels=labels)
        yield GaugeMetricFamily(*RUNNING, labels=("team",))
        yield GaugeMetricFamily(*QUOTA, labels=("team",))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts = {n: dict(v) for n, v in self._counts.items()}
            hists = {n: {labels: (list(h.counts), h.total) for labels, h in v.items()}
                     for n, v in self._hists.items()}
            running = {team: len(ids) for team, ids in self._running.items()}
        for name, (doc, labels) in COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=labels)
            for values, amount in counts[name].items():
                family.add_metric(values, amount)
            yield family
        for name, (doc, labels, buckets) in HISTOGRAMS.items():
            hfamily = HistogramMetricFamily(name, doc, labels=labels)
            bounds = [*map(go_string, buckets), "+Inf"]
            for values, (per_bucket, total) in hists[name].items():
                hfamily.add_metric(values, list(zip(bounds, accumulate(per_bucket),
                                                    strict=True)), total)
            yield hfamily
        gauge = GaugeMetricFamily(*RUNNING, labels=("team",))
        for team, n in running.items():
            gauge.add_metric((team,), n)
        yield gauge
        if self.quota is not None:
            quota = GaugeMetricFamily(*QUOTA, labels=("team",))
            for team in running:
                quota.add_metric((team,), self.quota(team))
            yield quota


#: event types with more to count than fleetplane_events
SPECIAL = frozenset({"ModelCall", "TaskSubmitted", "TaskStarted", "TaskFailed", "DeadLetter",
                     *FINISHED_NAMES})
