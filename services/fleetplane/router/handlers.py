"""The router's handler: events in, decisions out (no I/O; the state is a fold of the events).

* TaskAccepted      -> TaskCompleted(cached) from the response cache, or TaskHeld(budget) when the
                       team's budget is spent, or TaskRouted(attempt 1); TaskRejected when no model
                       can take the task.
* TaskEscalated(n)  -> TaskRouted(n) one tier up (the tier the coordinator asks for), or
                       TaskHeld(budget); TaskFailed(final) when no tier can take it.
* BudgetStatus      -> TaskRouted for the team's held tasks once the budget is no longer spent.
* outcomes          -> statistics per (task type, model) and cache entries (no output).

Every output's event id is derived from its input's, so reprocessing an input after a crash
re-publishes the same ids (consumers deduplicate) and the same decision (exploration and Thompson
draws are seeded by task id and attempt).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from confluent_kafka import Message

from fleetplane.core import events as ev
from fleetplane.core.catalog import Catalog
from fleetplane.core.errors import NotRetriable
from fleetplane.core.events import derived_id
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import Output, RawRecord, Record, headers_dict
from fleetplane.core.serde import default_serde
from fleetplane.core.teams import TeamsConfig
from fleetplane.router import holds
from fleetplane.router.cache import CACHE_MODEL, not_cacheable
from fleetplane.router.policy import (
    BudgetView,
    PolicyConfig,
    Unroutable,
    choose,
    quality_share,
)
from fleetplane.router.shared import PeerInbox, pending_records
from fleetplane.router.state import BUDGET_HOLD, RouterState

log = get_logger(__name__)


@dataclass(frozen=True)
class BudgetCheck:
    spent: bool
    view: BudgetView
    reason: str = ""


class Router:
    def __init__(self, catalog: Catalog, teams: TeamsConfig, state: RouterState,
                 cfg: PolicyConfig | None = None, replica: str | None = None) -> None:
        """`replica`: this replica's id on the shared state topic (fleetplane.router.shared);
        None: the statistics are not published (a single router, tests, the offline eval)."""
        self.catalog = catalog
        self.replica = replica
        self.inbox = PeerInbox()
        # held by the loop's thread while it handles an event, and by the follower's thread
        # while it applies another replica's record: the statistics are current between events
        self.lock = threading.Lock()
        self.published_signal: dict[str, int] = {}
        self.rebuilt: dict[str, int] = {}  # events per topic read at start-up
        self.teams = teams
        self.state = state
        self.cfg = cfg or PolicyConfig()
        self.cache_hits = 0
        self.semantic_hits = 0
        self.cache_saved_usd = 0.0
        # True (the service): the shared statistics and the holds are published once per
        # checkpoint by the loop's before_commit hook (commit_records), not after every event
        self.batch_shared = False
        self._holds_sent: set[str] = set()  # holds written since commit_records last ran
        self._serde = default_serde()

    def __call__(self, event: ev.Event, record: Record | None = None) -> list[Output]:
        with self.lock:
            if self.replica is not None:
                self.inbox.drain(self.replica, self.state.stats)
            outs: list[Output] = list(self.handle(event))
            if not self.batch_shared:
                outs += self._hold_records()
                if self.replica is not None:
                    outs += pending_records(self.replica, self.state.stats, self.state.signal,
                                            self.published_signal)
            return outs

    def commit_records(self) -> list[RawRecord]:
        """The loop's before_commit hook: the holds begun or ended in this transaction
        (fleetplane.router.holds) and the shared statistics' changed cells."""
        with self.lock:
            self._holds_sent = set()  # a new transaction
            records = self._hold_records()
        return records + self.shared_records()

    def _hold_records(self) -> list[RawRecord]:
        records = holds.pending(self.state, self.replica or "")
        self._holds_sent |= {(r.key or b"").decode() for r in records}
        return records

    def shared_records(self) -> list[RawRecord]:
        """The loop's before_commit hook: one record per cell changed in this transaction."""
        if self.replica is None:
            return []
        with self.lock:
            return pending_records(self.replica, self.state.stats, self.state.signal,
                                   self.published_signal)

    def on_abort(self) -> None:
        """An aborted transaction lost the records it published: every own cell is published
        again, and the holds it wrote are taken again from the state."""
        self.state.stats.dirty |= set(self.state.stats.own)
        self.published_signal.clear()
        # the holds' records of the aborted transaction: taken again from the state
        self.state.hold_changes |= self._holds_sent

    def follow_peers(self, msg: Message) -> None:
        """A record of the shared state topic, from the follower's thread: queued for the
        loop's thread."""
        value = msg.value()
        if value is None:
            return
        try:
            decoded = json.loads(value)
        except ValueError:
            self.inbox.malformed += 1
            return
        if isinstance(decoded, dict) and self.replica is not None:
            self.inbox.put(decoded)
            with self.lock:
                self.inbox.drain(self.replica, self.state.stats)

    def follow_budget(self, msg: Message) -> None:
        """A record of fleet.budget, from the follower's thread: every replica knows every
        team's budget status, so each holds the tasks of its own partitions when the team's
        budget is spent; the replica whose group partition carries the status releases the
        holds (its loop's handle)."""
        try:
            event = self._serde.decode(msg.value() or b"")
        except NotRetriable:
            return  # undecodable: the DLQ's business, not state
        if isinstance(event, ev.BudgetStatus):
            with self.lock:
                self.state.observe_budget(event)

    def follow_holds(self, msg: Message) -> None:
        """A record of router.holds, from the follower's thread: another replica's hold (or
        its end) applied under the router's lock; this replica's own are ignored (its state
        is ahead of them)."""
        if (msg.offset() or 0) < self.state.holds_read_to:
            return  # the start-up read it (rebuild.restore_holds)
        headers = headers_dict(msg.headers())
        writer = headers.get(holds.WRITER_HEADER, b"").decode()
        if msg.key() is not None:
            self.apply_hold(msg.key() or b"", msg.value(), writer,
                            headers.get(holds.ROUTED_HEADER))

    def apply_hold(self, key: bytes, value: bytes | None, writer: str,
                   routed: bytes | None = None) -> None:
        """One router.holds record written by replica `writer` (follow_holds)."""
        if self.replica is None or writer == self.replica:
            return
        task_id = key.decode()
        with self.lock:
            try:
                holds.apply_peer(self.state, task_id, value, routed)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("router.holds record ignored", held_task=task_id, error=str(exc))

    def handle(self, event: ev.Event) -> list[ev.Event]:
        if isinstance(event, ev.TaskAccepted):
            outs = self._route(event, event.spec, attempt=1, tag="routed/1")
        elif isinstance(event, ev.TaskEscalated):
            self.state.apply(event)
            outs = self._escalate(event)
        elif isinstance(event, ev.BudgetStatus):
            self.state.apply(event)
            outs = self._release(event)
        else:
            outs = []
        for out in outs:
            self.state.apply(out)
        self.state.apply(event)  # after the outputs: a held task's record takes its spec here
        return outs

    # -- budget ----------------------------------------------------------------------------------
    def budget(self, team: str) -> BudgetCheck:
        status = self.state.budgets.get(team)
        if status is None:
            return BudgetCheck(False, BudgetView())
        if status.remaining_usd <= 0:
            return BudgetCheck(True, BudgetView(low=True), (
                f"team {team} spent its {status.period} budget (${status.spent_usd:.2f} of "
                f"${status.budget_usd:.2f}); held until a budget status shows budget again"))
        share = self.teams.policy(team).low_budget_share
        if status.budget_usd > 0 and status.remaining_usd < share * status.budget_usd:
            return BudgetCheck(False, BudgetView(low=True, note=(
                f"team budget low (${status.remaining_usd:.2f} of ${status.budget_usd:.2f} "
                f"left, below {share:.0%}): q capped at "
                f"{self.cfg.low_budget_quality_share:.2f}, no exploration")))
        return BudgetCheck(False, BudgetView())

    # -- decisions --------------------------------------------------------------------------------
    def _route(self, cause: ev.Event, spec: ev.TaskSpec, *, attempt: int, tag: str,
               escalate_to: str | None = None, why: str = "") -> list[ev.Event]:
        key = f"{cause.task_id}/{attempt}"
        check = self.budget(cause.team)
        team = self.teams.policy(cause.team)
        try:
            q, q_source = quality_share(self.catalog, spec, team.quality_shares,
                                        team.quality_share)
            view = self.state.prompt_view(cause.task_id, spec)
            decision = choose(self.catalog, spec, self.state.stats, key=key, cfg=self.cfg,
                              budget=check.view, escalate_to=escalate_to, q=q,
                              q_source=q_source, prompt=view)
        except Unroutable as exc:
            if escalate_to is not None:
                return [cause.derive(
                    ev.TaskFailed, event_id=derived_id(cause.event_id, tag), attempt=attempt,
                    failure_class="model_error", final=True,
                    reason=f"cannot route the escalated attempt: {exc.reason}")]
            return [cause.derive(ev.TaskRejected, event_id=derived_id(cause.event_id, tag),
                                 reason=f"cannot route: {exc.reason}", field=exc.field,
                                 source=getattr(cause, "source", "kafka"))]
        if attempt == 1 and escalate_to is None and not_cacheable(spec) is None:
            hit = self.state.cache_lookup(spec, decision.model.tier, cause.team,
                                          cause.occurred_at)
            if hit is None:
                match = self.state.semantic_lookup(cause.task_id, spec, decision.model.tier,
                                                   cause.team, cause.occurred_at)
                if match is not None:
                    hit = match.entry
                    self.semantic_hits += 1
                    log.info("semantic cache hit", similarity=round(match.similarity, 4),
                             source_task=hit.source_task_id)
            if hit is not None:
                self.cache_hits += 1
                self.cache_saved_usd += decision.estimated_cost_usd
                log.info("cache hit", tier=decision.model.tier, source_task=hit.source_task_id,
                         saved_estimate_usd=decision.estimated_cost_usd)
                return [cause.derive(
                    ev.TaskCompleted, event_id=derived_id(cause.event_id, tag), attempt=1,
                    model=CACHE_MODEL, output=hit.output, cost_usd=0.0, duration_ms=0,
                    cached=True)]
        if check.spent:
            return [cause.derive(ev.TaskHeld, event_id=derived_id(cause.event_id, tag),
                                 reason=check.reason, kind=BUDGET_HOLD, attempt=attempt,
                                 held_by=f"budget:{cause.team}")]
        reason = f"{why}; {decision.reason}" if why else decision.reason
        return [cause.derive(
            ev.TaskRouted, event_id=derived_id(cause.event_id, tag), spec=spec, attempt=attempt,
            model=decision.model.name, provider=decision.model.provider,
            tier=decision.model.tier, reason=reason, alternatives=decision.alternatives,
            estimated_cost_usd=decision.estimated_cost_usd)]

    def _escalate(self, event: ev.TaskEscalated) -> list[ev.Event]:
        rec = self.state.tasks.get(event.task_id)
        spec = event.spec or (rec.spec if rec else None)
        tag = f"routed/{event.attempt}"
        if spec is None:
            return [event.derive(
                ev.TaskFailed, event_id=derived_id(event.event_id, tag), attempt=event.attempt,
                failure_class="model_error", final=True,
                reason="cannot route the escalated attempt: the escalation carries no spec and "
                       "the router has none for this task")]
        why = f"escalated from {event.from_tier} to {event.to_tier}: {event.reason}"
        return self._route(event, spec, attempt=event.attempt, tag=tag,
                           escalate_to=event.to_tier, why=why)

    def _release(self, status: ev.BudgetStatus) -> list[ev.Event]:
        if self.budget(status.team).spent:
            return []
        outs: list[ev.Event] = []
        for task_id, rec in self.state.held_tasks(status.team):
            if rec.spec is None or rec.held is None:
                log.warning("held task without a spec", held_task=task_id)
                continue
            attempt = rec.held
            # A synthetic cause carries the task's identity; ids derive from the status event.
            cause = ev.TaskAccepted(event_id=derived_id(status.event_id, task_id),
                                    task_id=task_id, team=rec.team, spec=rec.spec,
                                    occurred_at=status.occurred_at,
                                    causation_id=status.event_id)
            tier = rec.escalations.get(attempt)
            why = (f"released from the budget hold (${status.remaining_usd:.2f} of "
                   f"${status.budget_usd:.2f} left)")
            for out in self._route(cause, rec.spec, attempt=attempt, tag=f"released/{attempt}",
                                   escalate_to=tier, why=why):
                outs.append(out.model_copy(update={"causation_id": status.event_id}))
        return outs
