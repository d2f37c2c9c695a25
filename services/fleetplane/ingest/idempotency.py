"""Idempotency keys: the same key from the same team names the same task, never a second one.

Two mechanisms, so that neither an ingest restart nor several replicas break the promise:

* HTTP/CLI/SDK submissions get a deterministic task id, ``uuid5(team, key)``: a retried request
  answers with the same task id whatever replica serves it, before or after a restart.
* Marks: when the validator accepts a keyed submission it records ``team/key -> task id`` on the
  compacted topic ``ingest.idempotency`` (acknowledged before the acceptance is committed), and
  every replica follows that topic. A later submission with the same team and key is not accepted
  again: the same task id (a redelivery or a retried request) is dropped; a different task id (a
  raw Kafka producer that made up a new id) gets a TaskRejected naming the original task.

A mark outlives what it names when the broker loses acknowledged writes on a hard crash (the
embedded broker on SIGKILL: the submission and its acceptance gone, the mark kept, in the topic or
in a replica's memory). A client retrying with the same key must then get its task recreated,
not an idempotent replay of a task that does not exist: ``lost_task`` tells, and the replay
re-publishes the original submission (same task id, same event id, so a copy that did survive is
recognised downstream as the same event).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fleetplane.core.errors import Retriable
from fleetplane.core.events import Event, TaskAccepted, TaskSpec, TaskSubmitted
from fleetplane.core.loop import Output, Record
from fleetplane.ingest.kvtopic import table_record
from fleetplane.ingest.names import NAMES_TOPIC, NameIndex, name_key, name_record

IDEMPOTENCY_TOPIC = "ingest.idempotency"
#: a mark younger than this is trusted as is (accounting may not have recorded its task yet)
LOST_AFTER_S = 30.0
_NAMESPACE = uuid.UUID("0b7f9e1c-4d2a-4c55-9a1e-3f6b2d8c7e01")


def task_id_for(team: str, key: str) -> str:
    """The task id an HTTP submission with this team and idempotency key gets."""
    return uuid.uuid5(_NAMESPACE, f"{team}\x00{key}").hex


def mark_key(team: str, key: str) -> str:
    return f"{team}/{key}"


def spec_digest(spec: TaskSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Mark:
    task_id: str
    event_id: str
    spec_sha256: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "event_id": self.event_id,
                "spec_sha256": self.spec_sha256, "at": self.at}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Mark:
        return cls(task_id=str(raw["task_id"]), event_id=str(raw.get("event_id", "")),
                   spec_sha256=str(raw.get("spec_sha256", "")), at=float(raw.get("at", 0)))


Lookup = Callable[[str, str], Mark | None]


def lost_task(mark: Mark, recorded_events: Callable[[str], list[dict[str, Any]]], *,
              now: float | None = None, after_s: float = LOST_AFTER_S) -> bool:
    """Whether the task `mark` names is gone: the mark is older than `after_s` and its
    acceptance was never recorded (``recorded_events(task_id)``: accounting's events of the
    task, rows with ``event_type``; a submission the broker lost after accounting read it
    leaves a TaskSubmitted alone). Accounting unreachable is no evidence: not lost."""
    if (time.time() if now is None else now) - mark.at < after_s:
        return False
    try:
        events = recorded_events(mark.task_id)
    except Retriable:
        return False
    return not any(e.get("event_type") not in (None, "TaskSubmitted") for e in events)


def resubmission(mark: Mark, team: str, spec: TaskSpec, key: str,
                 source: str) -> TaskSubmitted:
    """The original submission of a lost task, to publish again."""
    return TaskSubmitted(event_id=mark.event_id, task_id=mark.task_id, team=team, spec=spec,
                         source=source, idempotency_key=key)


class Marks:
    """The marks this replica knows: followed from the topic, plus its own writes. Marks older
    than the window are dropped as new ones come (oldest first), as the topic's retention
    drops their records: a replica holds the window's marks, not every mark since it started."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._marks: dict[str, Mark] = {}
        self._added: deque[tuple[float, str]] = deque()  # (mark time, key), as applied
        self._lock = threading.Lock()

    def apply(self, key: str, value: dict[str, Any] | None) -> None:
        with self._lock:
            if value is None:
                self._marks.pop(key, None)
            else:
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    mark = self._marks[key] = Mark.from_json(value)
                    self._added.append((mark.at, key))
            horizon, added = time.time() - self.window_s, self._added
            while added and added[0][0] < horizon:
                at, old = added.popleft()
                found = self._marks.get(old)
                if found is not None and found.at == at:  # not marked again since
                    del self._marks[old]

    def get(self, team: str, key: str) -> Mark | None:
        with self._lock:
            mark = self._marks.get(mark_key(team, key))
        if mark is None or time.time() - mark.at > self.window_s:
            return None
        return mark

    def __len__(self) -> int:
        with self._lock:
            return len(self._marks)


class PublishedKeys:
    """Idempotency keys this API replica published and the broker acknowledged, answered as
    replays until the ingest loop's mark for them arrives (a client retrying at once otherwise
    got a second 202: the mark is written when the loop accepts the task, a few milliseconds
    to seconds later). Kept apart from `Marks`, which the loop itself deduplicates by: a key
    here has not been accepted yet. Bounded, and short-lived on purpose: after the window a
    retry goes the usual way (the loop's mark, or a new publication of the same task id), so a
    submission the broker lost after acknowledging it (a hard crash) is still recreated by a
    client's later retry."""

    def __init__(self, window_s: float = 5.0, capacity: int = 100_000) -> None:
        self.window_s = window_s
        self.capacity = capacity
        self._keys: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, team: str, key: str, task_id: str, spec_sha256: str) -> None:
        with self._lock:
            self._keys[mark_key(team, key)] = (task_id, spec_sha256, time.time())
            self._keys.move_to_end(mark_key(team, key))
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def get(self, team: str, key: str) -> tuple[str, str] | None:
        """(task id, spec digest) of a recent publication of `key`, or None."""
        with self._lock:
            found = self._keys.get(mark_key(team, key))
        if found is None or time.time() - found[2] > self.window_s:
            return None
        return found[0], found[1]


class MarkingHandler:
    """Wraps the pure validator. An accepted keyed submission's mark, and every accepted
    task's name (dependencies by name: ingest.names), are outputs of the same step: published
    in the transaction (or flush) that commits the acceptance, so no acceptance is committed
    without its mark. This replica's tables learn them at once."""

    def __init__(self, handler: Callable[[Event, Record, Lookup], Iterable[Output]],
                 marks: Marks, names: NameIndex | None = None) -> None:
        self.handler = handler
        self.marks = marks
        self.names = names

    def __call__(self, event: Event, record: Record) -> list[Output]:
        out = list(self.handler(event, record, self.marks.get))
        extra: list[Output] = []
        for accepted in out:
            if not isinstance(accepted, TaskAccepted):
                continue
            if isinstance(event, TaskSubmitted) and event.idempotency_key:
                mark = Mark(task_id=event.task_id, event_id=event.event_id,
                            spec_sha256=spec_digest(event.spec), at=time.time())
                key = mark_key(event.team, event.idempotency_key)
                extra.append(table_record(IDEMPOTENCY_TOPIC, key, mark.to_json()))
                self.marks.apply(key, mark.to_json())
            if self.names is not None:
                extra.append(table_record(
                    NAMES_TOPIC, name_key(accepted.team, accepted.task_id),
                    name_record(accepted.team, accepted.spec.name, accepted.task_id)))
                self.names.add(accepted.team, accepted.spec.name, accepted.task_id)
        return [*extra, *out]
