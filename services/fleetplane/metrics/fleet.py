"""Fleet metrics from the event stream: counters and histograms a platform team alerts on."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetplane.core import events as ev
from fleetplane.core.bounded import Bounded

#: submit -> finished, seconds: agent tasks take from seconds to hours
TASK_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)

FINISHED: dict[type[ev.Event], str] = {
    ev.TaskCompleted: "completed", ev.TaskFailed: "failed", ev.TaskAbandoned: "abandoned",
    ev.TaskCancelled: "cancelled", ev.TaskRolledBack: "rolled_back", ev.TaskRejected: "rejected",
}


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

    def observe(self, event: ev.Event) -> None:
        if event.event_id in self._seen:
            return
        self._seen.put(event.event_id, 0.0)
        kind = type(event)
        self.events.labels(kind.__name__, event.team).inc()
        at = event.occurred_at.timestamp()
        if kind is ev.TaskSubmitted:
            ended = self._ended_first.pop(event.task_id, None)
            if ended is None:
                self._submitted.put(event.task_id, at)
            else:
                outcome, team, end = ended
                self.duration.labels(outcome, team).observe(max(0.0, end - at))
        elif isinstance(event, ev.TaskStarted):
            if self._ended.get(event.task_id, 0.0) < event.attempt:
                self._set_running(event.team, event.task_id, True)
        elif isinstance(event, ev.TaskFailed) and not event.final:
            # an attempt failed and the task is retried: not finished, no longer running
            self._ended.put(event.task_id, max(self._ended.get(event.task_id, 0.0),
                                               float(event.attempt)))
            self._set_running(event.team, event.task_id, False)
        elif kind in FINISHED:
            self._ended.put(event.task_id, ENDED)
            self._finish(event, FINISHED[kind], at)
        elif isinstance(event, ev.ModelCall):
            self._model_call(event)
        elif isinstance(event, ev.DeadLetter):
            self.dead_letters.labels(event.service, event.error_class).inc()

    def _finish(self, event: ev.Event, outcome: str, at: float) -> None:
        self.finished.labels(outcome, event.team).inc()
        submitted = self._submitted.pop(event.task_id, None)
        if submitted is not None:
            self.duration.labels(outcome, event.team).observe(max(0.0, at - submitted))
        else:
            self._ended_first.put(event.task_id, (outcome, event.team, at))
        if isinstance(event, ev.TaskCompleted) and event.cached:
            self.cache_hits.labels(event.team).inc()
        self._set_running(event.team, event.task_id, False)

    def _set_running(self, team: str, task_id: str, running: bool) -> None:
        ids = self._running.setdefault(team, set())
        if running:
            ids.add(task_id)
        else:
            ids.discard(task_id)
        self.running.labels(team).set(len(ids))
        if self.quota is not None:
            self.quota_gauge.labels(team).set(self.quota(team))

    def _model_call(self, call: ev.ModelCall) -> None:
        self.calls.labels(call.model, call.team, call.outcome).inc()
        for kind, n in (("input", call.input_tokens), ("output", call.output_tokens),
                        ("cache_creation", call.cache_creation_input_tokens),
                        ("cache_read", call.cache_read_input_tokens)):
            if n:
                self.tokens.labels(call.model, call.team, kind).inc(n)
        if call.cost_usd > 0:
            self.cost.labels(call.model, call.team).inc(call.cost_usd)
        self.call_seconds.labels(call.model).observe(max(0.0, call.latency_ms / 1000))
