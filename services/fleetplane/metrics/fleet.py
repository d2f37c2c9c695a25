"""Fleet metrics from the event stream: counters and histograms a platform team alerts on."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


#: `FleetMetrics._ended` of a task in a terminal state: no attempt of it runs again
ENDED = float("inf")


class FleetMetrics:
    """`observe(event)` for every event the accounting service consumes. Redeliveries are not
    counted twice (recent event ids are remembered). `quota(team)` gives a team's running
    quota (teams.yaml) for the running-vs-quota gauge."""

    def __init__(self, quota: Callable[[str], int] | None = None,
                 registry: CollectorRegistry | None = None, memory: int = 200_000) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.quota = quota
        self.events = Counter("fleetplane_events", "Events seen, by type and team",
                              ["type", "team"], registry=r)
        self.finished = Counter("fleetplane_tasks_finished", "Tasks that reached a terminal "
                                "state, by outcome and team", ["outcome", "team"], registry=r)
        self.duration = Histogram("fleetplane_task_duration_seconds", "Submit to terminal, by "
                                  "outcome and team", ["outcome", "team"], buckets=TASK_BUCKETS,
                                  registry=r)
        self.running = Gauge("fleetplane_tasks_running", "Tasks with an attempt running, by "
                             "team", ["team"], registry=r)
        self.quota_gauge = Gauge("fleetplane_team_running_quota", "A team's running quota "
                                 "(teams.yaml max_running)", ["team"], registry=r)
        self.calls = Counter("fleetplane_model_calls", "Model calls, by model, team and outcome",
                             ["model", "team", "outcome"], registry=r)
        self.tokens = Counter("fleetplane_model_tokens", "Tokens, by model, team and kind",
                              ["model", "team", "kind"], registry=r)
        self.cost = Counter("fleetplane_model_cost_usd", "Provider-reported cost (USD), by model "
                            "and team", ["model", "team"], registry=r)
        self.call_seconds = Histogram("fleetplane_model_call_seconds", "Model call latency, by "
                                      "model", ["model"], buckets=CALL_BUCKETS, registry=r)
        self.cache_hits = Counter("fleetplane_cache_hits", "Tasks answered from the response "
                                  "cache, by team", ["team"], registry=r)
        self.dead_letters = Counter("fleetplane_dead_letters", "Records dead-lettered, by "
                                    "service and error class", ["service", "error_class"],
                                    registry=r)
        self._seen: Bounded[str, float] = Bounded(memory)
        self._submitted: Bounded[str, float] = Bounded(memory)
        # outcomes read before their submission (other topics, no order between them): the
        # duration is observed when the submission arrives
        self._ended_first: Bounded[str, tuple[str, str, float]] = Bounded(memory)
        self._running: dict[str, set[str]] = {}
        # per task, the last attempt that ended (ENDED for a terminal task): a TaskStarted
        # (tasks.lifecycle) read after its attempt's end (tasks.outcomes, no order between the
        # topics) does not count the task as running again (seen in the metrics e2e run)
        self._ended: Bounded[str, float] = Bounded(memory)
        # label children looked up once (labels() takes a lock and builds a key per call)
        self._children: dict[tuple[Counter | Gauge | Histogram, tuple[str, ...]], Any] = {}

    def observe(self, event: ev.Event) -> None:
        """One event (the accounting's per-record path)."""
        self.observe_batch(((type(event).__name__, event.__dict__),))

    def observe_batch(self, events: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """Events as (type name, field dict), e.g. a sink batch's decoded records, without an
        event object each (pydantic's model_construct cost 8 us per event, more than the
        sink's own work on it). The counters are incremented once per label set per batch:
        the totals are those of one observe per event."""
        adds: dict[tuple[Counter, tuple[str, ...]], float] = defaultdict(float)
        seen = self._seen
        for name, d in events:
            event_id = d["event_id"]
            if event_id in seen:
                continue
            seen.put(event_id, 0.0)
            try:
                self._one(name, d, adds)
            except Exception:  # a metric must never stop the sink: the event is stored anyway
                log.exception("fleet metrics: event not counted", event_type=name,
                              task_id=d.get("task_id"))
        for (metric, labels), amount in adds.items():
            self._child(metric, *labels).inc(amount)

    def _child(self, metric: Counter | Gauge | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once."""
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[(metric, labels)] = metric.labels(*labels)
        return child

    def _one(self, name: str, d: Mapping[str, Any],
             adds: dict[tuple[Counter, tuple[str, ...]], float]) -> None:
        team = d["team"]
        adds[(self.events, (name, team))] += 1
        if name == "ModelCall":
            self._model_call(d, adds)
        elif name == "TaskSubmitted":
            ended = self._ended_first.pop(d["task_id"], None)
            at = d["occurred_at"].timestamp()
            if ended is None:
                self._submitted.put(d["task_id"], at)
            else:
                outcome, team_of, end = ended
                self._child(self.duration, outcome, team_of).observe(max(0.0, end - at))
        elif name == "TaskStarted":
            if self._ended.get(d["task_id"], 0.0) < d["attempt"]:
                self._set_running(team, d["task_id"], True)
        elif name == "TaskFailed" and not d["final"]:
            # an attempt failed and the task is retried: not finished, no longer running
            task_id = d["task_id"]
            self._ended.put(task_id, max(self._ended.get(task_id, 0.0),
                                         float(d["attempt"])))
            self._set_running(team, task_id, False)
        elif name in FINISHED_NAMES:
            self._ended.put(d["task_id"], ENDED)
            self._finish(name, d, adds)
        elif name == "DeadLetter":
            adds[(self.dead_letters, (d["service"], d["error_class"]))] += 1

    def _finish(self, name: str, d: Mapping[str, Any],
                adds: dict[tuple[Counter, tuple[str, ...]], float]) -> None:
        outcome, team, task_id = FINISHED_NAMES[name], d["team"], d["task_id"]
        at = d["occurred_at"].timestamp()
        adds[(self.finished, (outcome, team))] += 1
        submitted = self._submitted.pop(task_id, None)
        if submitted is not None:
            self._child(self.duration, outcome, team).observe(max(0.0, at - submitted))
        else:
            self._ended_first.put(task_id, (outcome, team, at))
        if name == "TaskCompleted" and d["cached"]:
            adds[(self.cache_hits, (team,))] += 1
        self._set_running(team, task_id, False)

    def _set_running(self, team: str, task_id: str, running: bool) -> None:
        ids = self._running.setdefault(team, set())
        if running:
            ids.add(task_id)
        else:
            ids.discard(task_id)
        self._child(self.running, team).set(len(ids))
        if self.quota is not None:
            self._child(self.quota_gauge, team).set(self.quota(team))

    def _model_call(self, d: Mapping[str, Any],
                    adds: dict[tuple[Counter, tuple[str, ...]], float]) -> None:
        model, team = d["model"], d["team"]
        adds[(self.calls, (model, team, d["outcome"]))] += 1
        for kind, field in TOKEN_FIELDS:
            n = d[field]
            if n:
                adds[(self.tokens, (model, team, kind))] += n
        if d["cost_usd"] > 0:
            adds[(self.cost, (model, team))] += d["cost_usd"]
        self._child(self.call_seconds, model).observe(max(0.0, d["latency_ms"] / 1000))
