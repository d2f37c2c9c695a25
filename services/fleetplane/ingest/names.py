"""Task names per team, so that a dependency given by name resolves to one task id at intake.

Names are not unique: a team submits "nightly-report" every night. A dependency is a task *id*
once intake has accepted it: the coordinator waits for ids, never for names. At intake a
`dependsOn` entry is resolved, in this order (docs/intake.md, "Dependencies"):

1. an earlier manifest of the same batch with that name (a DAG sent as one multi-document file);
2. a task id of the submitting team;
3. the name of exactly one task of the team.

A name of no task, or of several, is refused with the field at fault (HTTP 422; on the raw Kafka
path a TaskRejected and a dead letter). Ids older than the names window are looked up in the
task history (accounting) by the HTTP API.

The index is followed from the compacted topic ``ingest.names`` (one record per accepted task,
key ``team/task_id``, written by the validator when it accepts the task), plus this replica's own
submissions the moment the broker acknowledges them. One record per task means concurrent
writers never overwrite each other's names.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

NAMES_TOPIC = "ingest.names"


def name_key(team: str, task_id: str) -> str:
    return f"{team}/{task_id}"


def name_record(team: str, name: str, task_id: str) -> dict[str, Any]:
    return {"team": team, "name": name, "task_id": task_id, "at": time.time()}


@dataclass(frozen=True)
class Unresolved:
    """Why a dependency could not be resolved: its position in dependsOn and the reason."""

    index: int
    reason: str


class NameIndex:
    """team -> name -> task ids, and task id -> (team, name), for tasks accepted within
    `window_s`. Thread-safe: the table thread applies records while requests resolve.

    Tasks accepted longer than `window_s` ago are dropped as new ones come (oldest first), as
    the topic's retention drops their records: a replica that has run for a month holds the
    window, not the month (until stop 29 it held every name it had seen since it started)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._by_name: dict[tuple[str, str], dict[str, float]] = {}
        self._by_id: dict[str, tuple[str, str]] = {}
        self._added: deque[tuple[float, str]] = deque()  # (accepted at, task id), as added
        self._lock = threading.Lock()

    def apply(self, key: str, value: dict[str, Any] | None) -> None:
        """A record of ``ingest.names`` (a tombstone removes the task named by the key)."""
        if value is None:
            team, _, task_id = key.partition("/")
            self.forget(team, task_id)
            return
        try:
            team, name, task_id = str(value["team"]), str(value["name"]), str(value["task_id"])
            at = float(value.get("at", time.time()))
        except (KeyError, TypeError, ValueError):
            return
        self.add(team, name, task_id, at)

    def add(self, team: str, name: str, task_id: str, at: float | None = None) -> None:
        now = time.time()
        at = now if at is None else at
        if at < now - self.window_s:
            return  # outside the window already (a record the topic's retention has not cut)
        with self._lock:
            self._by_name.setdefault((team, name), {})[task_id] = at
            self._by_id[task_id] = (team, name)
            self._added.append((at, task_id))
            self._expire(now - self.window_s)

    def _expire(self, horizon: float) -> None:
        """Drop the tasks accepted before `horizon` (the lock held). An entry whose task was
        added again later (a newer time) is skipped: its newer entry drops it."""
        added = self._added
        while added and added[0][0] < horizon:
            at, task_id = added.popleft()
            known = self._by_id.get(task_id)
            if known is not None and self._by_name.get(known, {}).get(task_id) == at:
                self._drop(task_id, known)

    def forget(self, team: str, task_id: str) -> None:
        with self._lock:
            known = self._by_id.get(task_id)
            if known is None or known[0] != team:
                return
            self._drop(task_id, known)

    def _drop(self, task_id: str, known: tuple[str, str]) -> None:
        del self._by_id[task_id]
        ids = self._by_name.get(known)
        if ids is not None:
            ids.pop(task_id, None)
            if not ids:
                del self._by_name[known]

    def team_of(self, task_id: str) -> str | None:
        with self._lock:
            known = self._by_id.get(task_id)
        return known[0] if known else None

    def ids_named(self, team: str, name: str) -> list[str]:
        """The team's tasks with this name accepted within the window, oldest first."""
        horizon = time.time() - self.window_s
        with self._lock:
            ids = dict(self._by_name.get((team, name), {}))
        return [tid for tid, at in sorted(ids.items(), key=lambda kv: kv[1]) if at >= horizon]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)


def resolve(team: str, deps: Sequence[str], index: NameIndex, *,
            batch: dict[str, str | None] | None = None,
            known_id: Callable[[str], bool] | None = None,
            strict: bool = True) -> tuple[list[str], list[Unresolved]]:
    """The task ids `deps` name for `team`, and what could not be resolved.

    `batch`: names of earlier manifests of the same request -> their task ids (None: a name
    several of them share). `known_id`: a
    slower lookup of a task id of the team outside the index (the task history); called only
    for entries nothing else resolves. `strict=False` (the raw Kafka path, where a dependency
    may be accepted in another partition a moment later) keeps an entry that names no known
    task as it is, as an id the coordinator waits for; an ambiguous name is refused always."""
    resolved: list[str] = []
    problems: list[Unresolved] = []
    for i, dep in enumerate(deps):
        if batch is not None and dep in batch:
            in_batch = batch[dep]
            if in_batch is None:
                problems.append(Unresolved(i, f"{dep!r} names several manifests of this "
                                              "request: give them distinct names"))
            else:
                resolved.append(in_batch)
            continue
        owner = index.team_of(dep)
        if owner == team:
            resolved.append(dep)
            continue
        ids = index.ids_named(team, dep)
        if len(ids) == 1:
            resolved.append(ids[0])
        elif len(ids) > 1:
            shown = ", ".join(ids[-3:])
            problems.append(Unresolved(i, f"{dep!r} names {len(ids)} tasks of team {team} "
                                          f"(latest: {shown}): give the task id"))
        elif owner is None and known_id is not None and known_id(dep):
            resolved.append(dep)
        elif strict or owner is not None:
            problems.append(Unresolved(i, f"{dep!r} names no task of team {team} "
                                          "(neither a task id nor a task name)"))
        else:
            resolved.append(dep)
    return resolved, problems
