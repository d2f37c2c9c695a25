"""The coordinator's state machine, pure: ``decide(state, event) -> (state, events)``.

No I/O, no clock (unless ``now`` is omitted), no randomness: derived event ids and retry delays
are functions of the input, so reprocessing an input after a crash yields the same outputs.

Contract with the caller (coordinator.app):
* the returned state is the same object as ``state`` when nothing changed (nothing to write);
* ``None`` is returned only for tasks that have no state and whose event created none;
* every returned event derives from the input (``Event.derive``: causation_id = input event_id).

See docs/coordinator.md for the state diagram.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from fleetplane.coordinator.backoff import backoff_ms, derived_event_id
from fleetplane.coordinator.state import Routing, Status, TaskState
from fleetplane.core import events as ev
from fleetplane.core.events import utcnow_ms

Decision = tuple[TaskState | None, list[ev.Event]]
E = TypeVar("E", bound=ev.Event)

#: The status each terminal event type leaves a task in.
TERMINAL_STATUS: dict[type[ev.Event], Status] = {
    ev.TaskCompleted: Status.COMPLETED,
    ev.TaskFailed: Status.FAILED,
    ev.TaskAbandoned: Status.ABANDONED,
    ev.TaskCancelled: Status.CANCELLED,
    ev.TaskRolledBack: Status.ROLLED_BACK,
}

#: failure_policy values that retry while attempts remain. escalate, abandon, rollback and hold
#: get their own transitions in a later issue; until then they follow "retry".
RETRYING_POLICIES = frozenset({"retry", "escalate", "abandon", "rollback", "hold"})


def decide(state: TaskState | None, event: ev.Event, *, now: datetime | None = None) -> Decision:
    """Apply one input event to a task's state; returns the new state and the events to emit."""
    if state is not None and event.event_id in state.seen:
        return state, []  # redelivered input: already applied
    if state is not None and state.terminal:
        return state, []  # nothing moves a task out of a terminal state
    at = now or utcnow_ms()
    if ev.is_terminal(event):
        return _on_terminal(state, event, at)
    handler = _HANDLERS.get(type(event))
    if handler is None:
        return state, []  # not an input of the coordinator (e.g. its own TaskRetrying echo)
    return handler(state, event, at)


# -- transitions -----------------------------------------------------------------------------
def _on_routed(state: TaskState | None, event: ev.Event, at: datetime) -> Decision:
    assert isinstance(event, ev.TaskRouted)
    if state is not None and event.attempt <= state.attempt:
        return state, []  # this attempt (or a later one) was already dispatched
    routing = Routing(model=event.model, provider=event.provider, tier=event.tier)
    if state is None:
        state = TaskState(task_id=event.task_id, team=event.team, status=Status.DISPATCHED,
                          updated_at=at)
    return _dispatch(state, event, event.spec, routing, event.attempt, at)


def _on_progress(state: TaskState | None, event: ev.Event, at: datetime) -> Decision:
    assert isinstance(event, ev.TaskStarted | ev.TaskHeartbeat)
    if state is None or event.attempt != state.attempt:
        return state, []  # unknown task or a stale attempt
    new = _update(state, event, at, status=Status.RUNNING, executor_id=event.executor_id,
                  last_heartbeat_at=event.occurred_at)
    return new, []


def _on_failed(state: TaskState | None, event: ev.Event, at: datetime) -> Decision:
    """A non-final failure of one attempt: retry while attempts remain, else fail for good."""
    assert isinstance(event, ev.TaskFailed) and not event.final
    if state is None or event.attempt != state.attempt or state.spec is None \
            or state.routing is None:
        return state, []
    spec = state.spec
    if event.attempt < spec.max_attempts and spec.failure_policy in RETRYING_POLICIES:
        nxt = event.attempt + 1
        retrying = _derive(event, ev.TaskRetrying, at, attempt=nxt,
                           delay_ms=backoff_ms(event.task_id, event.attempt),
                           reason=f"{event.failure_class}: {event.reason}")
        new, dispatched = _dispatch(state, event, spec, state.routing, nxt, at)
        return new, [retrying, *dispatched]
    final = _derive(event, ev.TaskFailed, at, attempt=event.attempt,
                    failure_class=event.failure_class, final=True, cost_usd=0.0,
                    reason=f"{event.reason} (attempt {event.attempt} of {spec.max_attempts})")
    return _finish(state, event, at, Status.FAILED, final), [final]


def _on_control(state: TaskState | None, event: ev.Event, at: datetime) -> Decision:
    assert isinstance(event, ev.ControlCommand)
    if event.command != "cancel" or not event.task_id:
        return state, []  # other commands arrive with later issues
    cancelled = _derive(event, ev.TaskCancelled, at,
                        reason=event.reason or "cancelled by operator",
                        requested_by=event.requested_by)
    if state is None:  # cancelled before it was routed: remember, so it is never dispatched
        state = TaskState(task_id=event.task_id, team=event.team, status=Status.CANCELLED,
                          updated_at=at)
    return _finish(state, event, at, Status.CANCELLED, cancelled), [cancelled]


def _on_terminal(state: TaskState | None, event: ev.Event, at: datetime) -> Decision:
    """A terminal outcome reported by another service (or our own, echoed back)."""
    attempt = getattr(event, "attempt", None)
    if state is not None and attempt is not None and attempt < state.attempt:
        return state, []  # the outcome of an attempt that was superseded
    status = TERMINAL_STATUS[type(event)]
    if state is None:  # e.g. the router completed it from the response cache
        state = TaskState(task_id=event.task_id, team=event.team, status=status,
                          attempt=attempt or 0, updated_at=at)
    return _finish(state, event, at, status, event), []


_HANDLERS: dict[type[ev.Event], Callable[[TaskState | None, ev.Event, datetime], Decision]] = {
    ev.TaskRouted: _on_routed,
    ev.TaskStarted: _on_progress,
    ev.TaskHeartbeat: _on_progress,
    ev.TaskFailed: _on_failed,  # final=True is handled as terminal before the lookup
    ev.ControlCommand: _on_control,
}


# -- helpers ---------------------------------------------------------------------------------
def _dispatch(state: TaskState, cause: ev.Event, spec: ev.TaskSpec, routing: Routing,
              attempt: int, at: datetime) -> Decision:
    """Admit and dispatch `attempt`. (Leases, quotas and dependencies will decide here whether
    the attempt is dispatched or held; for now every attempt is admitted.)"""
    leased = list(spec.write_scope)
    dispatched = _derive(cause, ev.TaskDispatched, at, spec=spec, attempt=attempt,
                         model=routing.model, provider=routing.provider, tier=routing.tier,
                         leased_paths=leased)
    new = _update(state, cause, at, status=Status.DISPATCHED, attempt=attempt, spec=spec,
                  routing=routing, leased_paths=leased, executor_id=None,
                  last_heartbeat_at=None)
    return new, [dispatched]


def _finish(state: TaskState, cause: ev.Event, at: datetime, status: Status,
            outcome: ev.Event) -> TaskState:
    """The terminal state: leases released, spec and routing dropped (no more attempts)."""
    return _update(state, cause, at, status=status, outcome=type(outcome).__name__, spec=None,
                   routing=None, leased_paths=[])


def _update(state: TaskState, cause: ev.Event, at: datetime, **changes: Any) -> TaskState:
    return state.model_copy(update={**changes, "updated_at": at,
                                    "seen": state.remember(cause.event_id)})


def _derive(cause: ev.Event, cls: type[E], at: datetime, **fields: Any) -> E:
    return cause.derive(cls, event_id=derived_event_id(cause.event_id, cls.__name__),
                        occurred_at=at, **fields)
