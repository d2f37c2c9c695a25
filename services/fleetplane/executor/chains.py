"""Audit chains no outcome vouches for, found in the executor's journal and reported (issue 19).

Edge-triggered, an attempt's audit chain (its ModelCall / ToolCall / WorkspaceChange events, real
spend) is reported by the attempt's outcome, or, when the coordinator declared the attempt lost
first (its heartbeats stopped: the executor was down longer than the lease), by the executor's
answer to the redelivered dispatch (handlers._claim). That answer needs the dispatch to come back
to the process whose journal holds the attempt. It does not when the dispatch goes to another
executor, when the broker lost the dispatch, or when the offsets moved past it: the chaos runs'
remaining audit breaks (an executor restarted after the broker's SIGKILL, mid-attempt).

`UnreportedChains` is the level-triggered side, in the manner of a controller: every
`interval_s` it compares what the journal holds with what the fleet's committed outcomes claim
(the lease table, leases.py). An attempt of the journal that

* holds audit events,
* has an outcome on the log (it is finished for the coordinator) that claims fewer of them, and
* is neither running here nor waiting here for its outcome's commit, and has been quiet for
  `grace_s` (its own report may be on its way),

is reported now: its audit events again (consumers deduplicate them by event id) and a non-final
``lost_executor`` TaskFailed with the chain's head, count and cost, which the coordinator does
not act on (the attempt is no longer its current one). Its event id is the one the redelivery
answer would give it (handlers), so both reports are one for every consumer.

An attempt is found by its journal file's name (`Journal.attempt_of`), and the file is read only
once the lease table knows an outcome of that attempt; a task id a file name cannot hold
(workspace.safe_name changes it) is not found under its file name and is not swept."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from fleetplane.core import failures
from fleetplane.core.events import Event, TaskCompleted, TaskFailed, derived_id
from fleetplane.core.logging import get_logger, task_context
from fleetplane.executor.leases import Lease, LeaseTable
from fleetplane.executor.runtime import Journal, Runtime

log = get_logger(__name__)

REASON = ("the attempt's audit chain was not reported by any outcome (the coordinator declared "
          "the attempt lost while the executor was away); reported from the executor's journal")


def lost_report(task_id: str, team: str, dispatch_id: str, attempt: int, tag: str,
                cost_usd: float, audit_head: str, audit_count: int, reason: str) -> TaskFailed:
    """A non-final lost_executor outcome carrying an attempt's audit chain (its spend)."""
    return TaskFailed(task_id=task_id, team=team, causation_id=dispatch_id,
                      event_id=derived_id(dispatch_id, tag), attempt=attempt,
                      failure_class=failures.LOST_EXECUTOR, final=False, cost_usd=cost_usd,
                      audit_head=audit_head, audit_count=audit_count, reason=reason)


SETTLED, LATER, REPORTED = "settled", "later", "reported"


class UnreportedChains:
    """The journal's attempts whose audit chain no committed outcome claims, reported through
    `publish` (the live channel). `sweep()` is one pass; `start()` runs it every
    `interval_s` in a thread of its own."""

    def __init__(self, rt: Runtime, leases: LeaseTable, publish: Callable[[Event], None],
                 interval_s: float = 15.0, grace_s: float = 30.0) -> None:
        assert rt.journal is not None
        self.rt, self.leases, self.publish = rt, leases, publish
        self.journal: Journal = rt.journal
        self.interval_s, self.grace_s = interval_s, grace_s
        #: journal files read, by path -> the modification time they had (read again if it moves)
        self._seen: dict[str, float] = {}
        #: reported attempts -> when (reported again only if still unclaimed after 5 minutes)
        self._reported: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="unreported-chains", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception:  # a pass that failed is tried again at the next interval
                log.exception("journal sweep failed")

    def sweep(self, now: float | None = None) -> int:
        """One pass over the journal files of the lease table's window; the reports made."""
        now = time.time() if now is None else now
        busy = {(r.task_id, r.attempt) for r in [*self.rt.running(), *self.rt.uncommitted()]}
        window = self.leases.lookback_s
        made = 0
        for entry in os.scandir(self.journal.root):
            if not entry.name.endswith(".json"):
                continue
            try:
                mtime = entry.stat().st_mtime
            except OSError:
                continue
            if now - mtime > window or now - mtime < self.grace_s \
                    or self._seen.get(entry.path) == mtime:
                continue
            key = Journal.attempt_of(entry.name)
            lease = self.leases.get(*key) if key is not None and key not in busy else None
            if key is None or lease is None or not lease.done:
                continue  # not read: running or answered here, or no outcome yet (LATER)
            try:
                verdict = self._check(entry.path, key, lease, now)
            except Exception:  # an unreadable entry is not read again while unchanged
                log.exception("journal entry not understood", path=entry.path)
                verdict = SETTLED
            if verdict == SETTLED:
                self._seen[entry.path] = mtime
            made += verdict == REPORTED
        for path in [p for p, m in self._seen.items() if now - m > window]:
            del self._seen[path]
        for key in [k for k, at in self._reported.items() if now - at > window]:
            del self._reported[key]
        return made

    def _check(self, path: str, key: tuple[str, int], lease: Lease, now: float) -> str:
        """SETTLED (nothing to do while the file is unchanged), LATER or REPORTED, for the
        journal file of attempt `key`, whose outcome `lease` is on the log."""
        state = self.journal.read_path(path)
        raw = state.get("audit") if state else None
        audited = Journal.decode(raw) if isinstance(raw, list) else []
        if not state or not audited or lease.audit_count >= len(audited):
            return SETTLED
        if lease.expires_ms > (now - self.grace_s) * 1000 or \
                now - self._reported.get(key, -1e18) < 300:
            return LATER  # a recent outcome (the executor's own report may follow it)
        with task_context(key[0], event_type="TaskFailed"):
            self._report(key, audited[0].team, state, audited, lease.audit_count)
        self._reported[key] = now
        return REPORTED

    def _report(self, key: tuple[str, int], team: str, state: dict[str, Any],
                audited: list[Event], claimed: int) -> None:
        task_id, attempt = key
        dispatch = str(state.get("dispatch") or "")
        finished = Journal.decode(state["outcome"]) if isinstance(state.get("outcome"),
                                                                   list) else []
        if finished and not any(isinstance(e, TaskCompleted) for e in finished):
            outcome = finished  # a non-final TaskFailed already: the same record again
        else:
            # as handlers would answer the redelivered dispatch: "superseded" for a finished
            # attempt, "failed" for an interrupted one (one event id for both reports)
            outcome = [lost_report(task_id, team, dispatch, attempt,
                                   "superseded" if finished else "failed",
                                   float(state.get("cost") or 0.0), str(state.get("head") or ""),
                                   int(state.get("count") or len(audited)), REASON)]
        log.warning("audit chain no outcome claims: reported from the journal",
                    attempt=attempt, claimed=claimed, journal=len(audited))
        for e in [*audited, *outcome]:
            self.publish(e)
