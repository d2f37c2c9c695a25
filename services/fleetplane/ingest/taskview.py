"""Task state for the intake API, read from the accounting service's HTTP API (accounting owns
ClickHouse); team scoping is enforced by the caller (ingest.api), never trusted to accounting.

Tasks this replica published but accounting has not recorded yet are answered from a small
in-memory list of recent submissions (state "submitted"), so a client that polls right after
submitting gets its task, not a 404."""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from fleetplane.core.errors import Retriable

RECENT = 10_000


class AccountingUnavailable(Retriable):
    """Accounting did not answer; the caller should retry."""


class TaskView:
    def __init__(self, accounting_url: str, timeout_s: float = 10.0) -> None:
        self._http = httpx.Client(base_url=accounting_url, timeout=timeout_s)
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, task_id: str, team: str, name: str, task_type: str) -> None:
        row = {"task_id": task_id, "team": team, "name": name, "task_type": task_type,
               "state": "submitted", "reason": "", "model": "", "tier": "", "attempts": 0,
               "cost_usd": 0.0, "model_calls": 0,
               "submitted_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
               "updated_at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        with self._lock:
            self._recent[task_id] = row
            self._recent.move_to_end(task_id)
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)

    def _get(self, path: str, params: dict[str, Any]) -> httpx.Response:
        try:
            resp = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise AccountingUnavailable(f"accounting unreachable: {exc}") from exc
        if resp.status_code >= 500:
            raise AccountingUnavailable(f"accounting answered HTTP {resp.status_code}")
        return resp

    def task(self, task_id: str) -> dict[str, Any] | None:
        resp = self._get("/v1/tasks", {"task_id": task_id, "limit": 1})
        rows = resp.json() if resp.status_code == 200 else []
        if rows:
            row: dict[str, Any] = rows[0]
            return row
        with self._lock:
            recent = self._recent.get(task_id)
        return dict(recent) if recent else None

    def tasks(self, *, team: str | None, state: str | None, task_type: str | None,
              limit: int) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        for k, v in (("team", team), ("state", state), ("task_type", task_type)):
            if v is not None:
                params[k] = v
        resp = self._get("/v1/tasks", params)
        if resp.status_code != 200:
            raise AccountingUnavailable(f"accounting refused the query: {resp.text[:300]}")
        rows: list[dict[str, Any]] = resp.json()
        return rows

    def events(self, task_id: str, limit: int) -> list[dict[str, Any]]:
        resp = self._get(f"/v1/tasks/{quote(task_id, safe='')}/events", {"limit": limit})
        if resp.status_code == 404:
            return []
        rows: list[dict[str, Any]] = resp.json()
        return rows

    def cost(self, *, by: str, team: str | None, since: str | None,
             until: str | None) -> list[dict[str, Any]]:
        """Spend grouped by `by` (accounting's /v1/cost), for one team or all (None)."""
        params = {k: v for k, v in (("by", by), ("team", team), ("since", since),
                                    ("until", until)) if v is not None}
        resp = self._get("/v1/cost", params)
        if resp.status_code != 200:
            raise AccountingUnavailable(f"accounting refused the query: {resp.text[:300]}")
        rows: list[dict[str, Any]] = resp.json()
        return rows

    def budgets(self) -> list[dict[str, Any]]:
        """Every team's spend against its budget for the current period (accounting's
        /v1/budgets); the caller filters by team."""
        resp = self._get("/v1/budgets", {})
        if resp.status_code != 200:
            raise AccountingUnavailable(f"accounting refused the query: {resp.text[:300]}")
        rows: list[dict[str, Any]] = resp.json()
        return rows

    def close(self) -> None:
        self._http.close()
