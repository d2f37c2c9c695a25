"""Per-task facts the sink fills in: which task type a task has, for rows whose event does not
carry it (model calls); each attempt's call model; which model call is a task's first.

The type is on the task's lifecycle rows (TaskSubmitted/Accepted/Routed/... carry the spec). The
sink remembers the types of the transition rows it sees (a bounded LRU) and asks ClickHouse once
per flush for the task ids it has not seen (e.g. after a restart). A task whose submission was
not stored yet keeps an empty type; analytics queries fall back to joining task_transitions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from fleetplane.accounting.rows import MODEL_CALLS_COLUMNS
from fleetplane.accounting.store import Store

_TASK, _TEAM, _ATTEMPT, _INDEX, _MODEL, _TIER = (MODEL_CALLS_COLUMNS.index(c) for c in (
    "task_id", "team", "attempt", "call_index", "model", "tier"))


class TaskTypes:
    def __init__(self, store: Store, capacity: int = 200_000) -> None:
        self.store = store
        self.capacity = capacity
        self._known: OrderedDict[str, str] = OrderedDict()

    def remember(self, task_id: str, task_type: str) -> None:
        if not task_type:
            return
        self._known[task_id] = task_type
        self._known.move_to_end(task_id)
        while len(self._known) > self.capacity:
            self._known.popitem(last=False)

    def resolve(self, task_ids: Iterable[str]) -> dict[str, str]:
        """task id -> type for the ids whose type is known here or in ClickHouse."""
        wanted = set(task_ids)
        found = {t: self._known[t] for t in wanted if t in self._known}
        missing = sorted(wanted - set(found))
        if missing:
            rows = self.store.query(
                f"SELECT task_id, argMaxIf(task_type, occurred_at, task_type != '') AS task_type "
                f"FROM {self.store.table('task_transitions')} "
                "WHERE task_id IN {ids:Array(String)} GROUP BY task_id",
                {"ids": missing},
            )
            for row in rows:
                if row["task_type"]:
                    found[row["task_id"]] = row["task_type"]
                    self.remember(row["task_id"], row["task_type"])
        return found


class AttemptModels:
    """The model and tier of each attempt's last model call (highest call_index): remembered from
    the model-call rows the sink sees (a bounded LRU), else looked up in ClickHouse."""

    def __init__(self, store: Store, capacity: int = 200_000) -> None:
        self.store = store
        self.capacity = capacity
        self._known: OrderedDict[tuple[str, int], tuple[int, str, str]] = OrderedDict()

    def remember(self, row: tuple[Any, ...]) -> None:
        key = (str(row[_TASK]), int(row[_ATTEMPT]))
        index = int(row[_INDEX])
        seen = self._known.get(key)
        if seen is None or index >= seen[0]:
            self._known[key] = (index, str(row[_MODEL]), str(row[_TIER]))
        self._known.move_to_end(key)
        while len(self._known) > self.capacity:
            self._known.popitem(last=False)

    def resolve(self, attempts: Iterable[tuple[str, int]], teams: Iterable[str] = ()
                ) -> dict[tuple[str, int], tuple[str, str]]:
        """(task id, attempt) -> (model, tier) for the attempts with a model call; `teams` (of
        those tasks) narrows the ClickHouse lookup to their part of the sort key."""
        wanted = set(attempts)
        found = {k: (v[1], v[2]) for k in wanted if (v := self._known.get(k)) is not None}
        missing = wanted - set(found)
        if missing:
            rows = self.store.query(
                f"SELECT task_id, attempt, argMax(model, call_index) AS model, "
                f"argMax(tier, call_index) AS tier FROM {self.store.table('model_calls')} "
                "WHERE team IN {teams:Array(String)} AND task_id IN {ids:Array(String)} "
                "GROUP BY task_id, attempt",
                {"ids": sorted({t for t, _ in missing}), "teams": sorted(set(teams))})
            for row in rows:
                key = (str(row["task_id"]), int(row["attempt"]))
                if key in missing:
                    found[key] = (str(row["model"]), str(row["tier"]))
        return found


class FirstCalls:
    """Which model call is its task's first (lowest attempt, then call_index), for the rollups'
    task counts (model_calls.first_call; docs/accounting.md, "Counting tasks").

    Tasks with a stored model call are remembered in two generations of sets (bounded memory).
    A call of a task not remembered is its task's first when it is the lowest call of its task
    in the flush and either attempt <= 1 with call_index 0 (nothing can come before it) or no
    model call of the task is stored in ClickHouse (one lookup per flush, only for such tasks:
    after a restart, a retry whose earlier attempt made no call, a task forgotten by the sets)."""

    def __init__(self, store: Store, capacity: int = 400_000) -> None:
        self.store = store
        self.half = max(1, capacity // 2)
        self._new: set[str] = set()
        self._old: set[str] = set()
        self.lookups = 0

    def _seen(self, task_id: str) -> bool:
        return task_id in self._new or task_id in self._old

    def _remember(self, task_ids: Iterable[str]) -> None:
        self._new.update(task_ids)
        if len(self._new) >= self.half:
            self._old, self._new = self._new, set()

    def first_rows(self, rows: list[tuple[Any, ...]]) -> list[int]:
        """Indexes of the rows (model_calls rows of one flush, deduplicated) that are their
        task's first model call; every task of the rows is remembered as having a call."""
        lowest: dict[str, tuple[int, int, int]] = {}
        for i, row in enumerate(rows):
            task = row[_TASK]
            if self._seen(task):
                continue
            key = (int(row[_ATTEMPT]), int(row[_INDEX]))
            best = lowest.get(task)
            if best is None or key < best[:2]:
                lowest[task] = (*key, i)
        unsure = {task for task, (attempt, index, _) in lowest.items()
                  if not (attempt <= 1 and index == 0)}
        stored: set[str] = set()
        if unsure:
            self.lookups += 1
            teams = sorted({str(rows[lowest[t][2]][_TEAM]) for t in unsure})
            stored = {str(r[0]) for r in self.store.query_rows(
                f"SELECT DISTINCT task_id FROM {self.store.table('model_calls')} "
                "WHERE team IN {teams:Array(String)} AND task_id IN {ids:Array(String)}",
                {"teams": teams, "ids": sorted(unsure)})}
        self._remember(lowest)
        return sorted(i for task, (_, _, i) in lowest.items() if task not in stored)
