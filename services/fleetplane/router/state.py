"""The router's state as a fold of events (pure): what it routed, outcome statistics, the
response cache, the latest budget status per team, and the tasks held for budget.

``RouterState.apply`` takes every event the router reads or writes; applying an event twice is the
same as applying it once, so the live router (which applies its inputs and its own outputs) and a
router rebuilt at start-up from the topics (fleetplane.router.rebuild) hold the same state.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime

from fleetplane.core import events as ev
from fleetplane.core.catalog import Catalog
from fleetplane.router.cache import CACHE_MODEL, CacheEntry, ResponseCache, cache_key, not_cacheable
from fleetplane.router.features import EMBED_DIM, FeatureCache, Vector
from fleetplane.router.policy import RECENT_PROMPTS, PromptView, prompt_view
from fleetplane.router.semantic import Match, SemanticCache, scope_key, wording
from fleetplane.router.signal import PromptSignal, RecentPredictions
from fleetplane.router.stats import NEUTRAL_FAILURES, OutcomeStats

BUDGET_HOLD = "budget"
RECENTLY_DONE = 100_000  # terminal task ids remembered, so a late event does not revive a task


@dataclass
class TaskRecord:
    """One task the router has routed or held and that has not ended yet."""

    team: str
    spec: ev.TaskSpec | None = None
    models: dict[int, str] = field(default_factory=dict)  # attempt -> model routed
    counted: set[int] = field(default_factory=set)  # attempts whose outcome is in the stats
    escalations: dict[int, str] = field(default_factory=dict)  # attempt -> tier asked for
    held: int | None = None  # attempt held for budget, until routed
    held_at: datetime | None = None

    def model_of(self, attempt: int) -> str | None:
        """The model of an attempt: the coordinator retries an attempt on the model of the last
        routed attempt, so it is the latest routed attempt at or below `attempt`."""
        known = [a for a in self.models if a <= attempt]
        return self.models[max(known)] if known else None

    @property
    def waiting(self) -> bool:
        return self.held is not None and self.held not in self.models


class RouterState:
    def __init__(self, catalog: Catalog, cache_ttl_s: float, cache_scope: str = "team",
                 cache_max_entries: int = 100_000, features: FeatureCache | None = None,
                 semantic: SemanticCache | None = None,
                 semantic_features: FeatureCache | None = None) -> None:
        self.catalog = catalog
        self.semantic = semantic  # the guarded semantic cache (opt-in per task type)
        self.semantic_features = semantic_features or features
        self.features = features  # None: no per-prompt signal (per task type statistics only)
        self.signal = PromptSignal()
        # task type -> the per-prompt predictions of its recent decisions (policy._prompt_rank);
        # kept in memory only: after a restart the ranks wait for PolicyConfig.prompt_rank_min
        # new prompts of the type
        self.recent_predictions: dict[str, RecentPredictions] = {}
        self.cache_scope = cache_scope
        self.tasks: dict[str, TaskRecord] = {}
        self.done: OrderedDict[str, None] = OrderedDict()
        self.stats = OutcomeStats()
        self.cache = ResponseCache(cache_ttl_s, cache_max_entries)
        self.budgets: dict[str, ev.BudgetStatus] = {}
        # tasks whose budget hold began or ended since the last router.holds records were
        # taken (fleetplane.router.holds.pending)
        self.hold_changes: set[str] = set()
        # the router.holds offset the start-up read reached: the follower skips what it read
        # (a record and the tombstone after it applied again one by one would show a released
        # hold for a moment)
        self.holds_read_to = 0
        self.applied = 0
        # False while start-up re-reads outcomes the shared statistics already hold
        # (fleetplane.router.shared): they close tasks but are not counted again
        self.counting = True

    # -- queries -------------------------------------------------------------------------------
    def held_tasks(self, team: str) -> list[tuple[str, TaskRecord]]:
        held = [(tid, r) for tid, r in self.tasks.items() if r.team == team and r.waiting]
        return sorted(held, key=lambda item: (item[1].held_at or datetime.min, item[0]))

    def cache_lookup(self, spec: ev.TaskSpec, tier: str, team: str,
                     now: datetime) -> CacheEntry | None:
        """An answer for this task from `tier` or a tier above it (a stronger model's answer
        serves a weaker tier's request, never the reverse)."""
        t: str | None = tier
        while t is not None:
            entry = self.cache.get(cache_key(spec, t, team, self.cache_scope), now)
            if entry is not None:
                return entry
            t = self.catalog.tier_above(t)
        return None

    def semantic_vector(self, task_id: str, spec: ev.TaskSpec) -> Vector | None:
        """The prompt's embedding for the semantic cache, when the task type opted in."""
        if (self.semantic is None or self.semantic_features is None or not spec.prompt
                or not self.semantic.enabled(spec.task_type)):
            return None
        # the embedding of the normalised wording: case and spacing do not move it
        text = " ".join(wording(spec.prompt)) or spec.prompt
        return self.semantic_features.vector(f"{task_id}#semantic", text)[:EMBED_DIM]

    def semantic_lookup(self, task_id: str, spec: ev.TaskSpec, tier: str, team: str,
                        now: datetime) -> Match | None:
        """A near-duplicate's answer from `tier` or a tier above, within the team, task type,
        tool set and system prompt (fleetplane.router.semantic)."""
        x = self.semantic_vector(task_id, spec)
        if x is None or self.semantic is None:
            return None
        t: str | None = tier
        while t is not None:
            match = self.semantic.get(scope_key(spec, t, team), spec.prompt, x, now)
            if match is not None:
                return match
            t = self.catalog.tier_above(t)
        return None

    def prompt_vector(self, task_id: str, spec: ev.TaskSpec) -> Vector | None:
        """The task's prompt features (computed once per task, then cached)."""
        if self.features is None or not spec.prompt:
            return None
        return self.features.vector(task_id, spec.prompt)

    def prompt_view(self, task_id: str, spec: ev.TaskSpec) -> PromptView | None:
        """The prompt's success predictions by model, with those of the task type's recent
        prompts (this one's included)."""
        x = self.prompt_vector(task_id, spec)
        if x is None:
            return None
        seen = self.recent_predictions.get(spec.task_type)
        if seen is None:
            seen = self.recent_predictions[spec.task_type] = RecentPredictions(RECENT_PROMPTS)
        return prompt_view(self.signal, self.catalog.models, spec.task_type, x, seen)

    # -- the fold --------------------------------------------------------------------------------
    def apply(self, event: ev.Event) -> None:
        self.applied += 1
        if isinstance(event, ev.BudgetStatus):
            self.observe_budget(event)
            return
        if event.task_id in self.done:
            return
        if isinstance(event, ev.TaskRouted):
            rec = self._record(event)
            rec.spec = rec.spec or event.spec
            rec.models.setdefault(event.attempt, event.model)
            if rec.held is not None:
                self.hold_changes.add(event.task_id)
        elif isinstance(event, ev.TaskEscalated):
            rec = self._record(event)
            if event.spec is not None:
                rec.spec = event.spec
            rec.escalations.setdefault(event.attempt, event.to_tier)
        elif isinstance(event, ev.TaskHeld) and event.kind == BUDGET_HOLD:
            rec = self._record(event)
            if event.attempt not in rec.models and (rec.held is None
                                                    or event.attempt >= rec.held):
                rec.held = event.attempt
                rec.held_at = rec.held_at if rec.held_at else event.occurred_at
                self.hold_changes.add(event.task_id)
        elif isinstance(event, ev.TaskAccepted):
            rec_ = self.tasks.get(event.task_id)
            if rec_ is not None and rec_.spec is None:
                rec_.spec = event.spec  # a held task's spec (rebuild reads it last)
        elif isinstance(event, ev.TaskFailed):
            self._count(event.task_id, event.attempt,
                        success=False, cost=event.cost_usd,
                        neutral=event.failure_class in NEUTRAL_FAILURES)
            if event.final:
                self._finish(event.task_id)
        elif isinstance(event, ev.TaskCompleted):
            if not event.cached and event.model != CACHE_MODEL:
                self._count(event.task_id, event.attempt, success=True, cost=event.cost_usd)
                self._fill_cache(event)
            self._finish(event.task_id)
        elif ev.is_terminal(event):
            self._finish(event.task_id)

    def _record(self, event: ev.Event) -> TaskRecord:
        rec = self.tasks.get(event.task_id)
        if rec is None:
            rec = self.tasks[event.task_id] = TaskRecord(team=event.team)
        return rec

    def _count(self, task_id: str, attempt: int, *, success: bool, cost: float,
               neutral: bool = False) -> None:
        rec = self.tasks.get(task_id)
        if not self.counting or rec is None or attempt in rec.counted or rec.spec is None:
            return
        model = rec.model_of(attempt)
        if model is None:
            return
        rec.counted.add(attempt)
        if not neutral:
            self.stats.record(rec.spec.task_type, model, success, cost)
            x = self.prompt_vector(task_id, rec.spec)
            if x is not None:
                self.signal.update(model, rec.spec.task_type, x, success)

    def _fill_cache(self, event: ev.TaskCompleted) -> None:
        rec = self.tasks.get(event.task_id)
        model = self.catalog.models.get(event.model)
        if rec is None or rec.spec is None or model is None or not_cacheable(rec.spec):
            return
        key = cache_key(rec.spec, model.tier, rec.team, self.cache_scope)
        entry = CacheEntry(output=event.output, model=event.model, cost_usd=event.cost_usd,
                           created_at=event.occurred_at, source_task_id=event.task_id)
        self.cache.put(key, entry)
        x = self.semantic_vector(event.task_id, rec.spec)
        if x is not None and self.semantic is not None:
            self.semantic.put(scope_key(rec.spec, model.tier, rec.team), rec.spec.prompt, x,
                              entry)

    def observe_budget(self, status: ev.BudgetStatus) -> None:
        """The team's latest budget status: a status older than the one held is ignored (the
        loop and the follower of fleet.budget both apply statuses, each in the topic's order)."""
        current = self.budgets.get(status.team)
        if current is None or status.occurred_at >= current.occurred_at:
            self.budgets[status.team] = status

    def restore_hold(self, task_id: str, rec: TaskRecord) -> bool:
        """A budget hold read back from router.holds at start-up (before the task topics'
        lookback, whose events then apply over it); False if the task is known to have ended."""
        if task_id in self.done:
            return False
        self.tasks[task_id] = rec
        return True

    def _finish(self, task_id: str) -> None:
        rec = self.tasks.pop(task_id, None)
        if rec is not None and rec.held is not None:
            self.hold_changes.add(task_id)
        self.done[task_id] = None
        while len(self.done) > RECENTLY_DONE:
            self.done.popitem(last=False)
