"""Ingest handler for raw submissions on tasks.submitted (any producer): validate, accept or
reject. Rejections go to fleet.dlq with the reason and a TaskRejected for the submitter.

Pure: the idempotency marks seen so far come in as a lookup function (`Lookup`); writing the mark
of an accepted keyed submission is the composition root's job (idempotency.MarkingHandler)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fleetplane.core.events import Event, TaskAccepted, TaskRejected, TaskSubmitted, derived_id
from fleetplane.core.kafka import REDRIVE_HEADER
from fleetplane.core.loop import Record, Rejected
from fleetplane.ingest.idempotency import Lookup, Mark
from fleetplane.ingest.manifest import MAX_IDEMPOTENCY_KEY, check_spec
from fleetplane.ingest.names import NameIndex, resolve

MAX_TASK_ID = 128


def _no_marks(_team: str, _key: str) -> Mark | None:
    return None


def accept(event: Event, record: Record | None = None,
           seen: Lookup = _no_marks, *,
           known_repository: Callable[[str], bool] | None = None,
           names: NameIndex | None = None) -> Iterable[Event]:
    """`known_repository`: whether a repository name is registered (None: not checked).
    `names`: the team's task names, to resolve dependencies given by name to task ids (None:
    dependencies are passed on as given)."""
    if not isinstance(event, TaskSubmitted):
        raise Rejected(f"tasks.submitted takes TaskSubmitted, not {type(event).__name__}")
    if not event.task_id or len(event.task_id) > MAX_TASK_ID:
        raise Rejected(f"task_id: must be 1-{MAX_TASK_ID} characters")
    key = event.idempotency_key
    problem = check_spec(event.team, event.spec, event.task_id, known_repository)
    if problem is None and key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        problem = ("idempotency_key", f"must be 1-{MAX_IDEMPOTENCY_KEY} characters")
    spec = event.spec
    if problem is None and names is not None and spec.depends_on:
        ids, unresolved = resolve(event.team, spec.depends_on, names, strict=False)
        if unresolved:
            problem = ("spec.depends_on", unresolved[0].reason)
        elif ids != list(spec.depends_on):
            spec = spec.model_copy(update={"depends_on": ids})
    if problem is not None:
        field, reason = problem
        rejected = event.derive(TaskRejected, event_id=derived_id(event.event_id, "rejected"),
                                reason=f"{field}: {reason}", field=field, source=event.source)
        raise Rejected(f"{field}: {reason}", emit=[rejected])
    if key:
        mark = seen(event.team, key)
        if mark is not None and mark.event_id != event.event_id:
            if mark.task_id == event.task_id:
                if record is not None and REDRIVE_HEADER in record.headers:
                    # the reconciler found no answer to this task on the log: its acceptance
                    # was lost while the mark survived (a broker crash keeps some writes of a
                    # transaction and loses others). Accepted again, under the id the first
                    # acceptance had, so a copy that did survive is a duplicate by event id.
                    return [event.derive(TaskAccepted,
                                         event_id=derived_id(mark.event_id, "accepted"),
                                         spec=spec, source=event.source)]
                return []  # the same task submitted again (a retry): it exists already
            return [event.derive(
                TaskRejected, event_id=derived_id(event.event_id, "rejected"),
                reason=f"idempotency_key: duplicate of task {mark.task_id} (team {event.team} "
                       "already used this key)", field="idempotency_key", source=event.source)]
    return [event.derive(TaskAccepted, event_id=derived_id(event.event_id, "accepted"),
                         spec=spec, source=event.source)]
