"""Which task type a task has, for rows whose event does not carry it (model calls).

The type is on the task's lifecycle rows (TaskSubmitted/Accepted/Routed/... carry the spec). The
sink remembers the types of the transition rows it sees (a bounded LRU) and asks ClickHouse once
per flush for the task ids it has not seen (e.g. after a restart). A task whose submission was
not stored yet keeps an empty type; analytics queries fall back to joining task_transitions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from fleetplane.accounting.store import Store


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
