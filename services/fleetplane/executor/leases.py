"""Durable attempt leases (issue 13, build 3).

Before its first model call an attempt is claimed: its `TaskStarted` carries `lease_ms` and is
published and acknowledged by the broker (durable) before the agent runs; every `TaskHeartbeat`
renews the lease (live until `occurred_at + lease_ms`). Every executor reads the claims
and outcomes of the whole fleet from `tasks.lifecycle` and `tasks.outcomes` from `lookback_s`
ago, then follows the topics (`LeaseTable`), so a dispatch redelivered to another executor
(rebalance, restart elsewhere) is judged against the claim:

* claims (TaskStarted, TaskHeartbeat: non-transactional, from the live channel) are read by the
  process's follower, ``read_uncommitted``, so a dead producer's open transaction on a partition
  does not hide a live claim behind it;
* outcomes (TaskCompleted, TaskFailed, TaskRolledBack: transactional) are read by a follower of
  their own, ``read_committed``: only a committed outcome makes an attempt finished. (Reading them
  uncommitted made an outcome whose transaction was later aborted count as published: the
  attempt then got none.) Before the executor answers a redelivered dispatch of an attempt it
  knows (its journal, or a claim), `sync` waits, once per process, until that follower has read
  the outcome topics up to the ends they have after the loop's `init_transactions` (which aborts
  the transaction a SIGKILLed predecessor left open): an outcome the predecessor committed is
  then known, and is not published a second time.

* live and held by another executor: not run (the holder reports the outcome; if it dies its
  heartbeats stop and the coordinator declares the attempt lost after its heartbeat timeout);
* held by this executor id (a previous incarnation: this process never ran it), or expired:
  the attempt was interrupted; it is reported `lost_executor` (final=false), not run again, so
  the model is never called twice for one attempt;
* finished (a TaskCompleted, TaskFailed or TaskRolledBack of that attempt on tasks.lifecycle
  or tasks.outcomes): not run, nothing reported (its outcome is already published);
* no claim: the attempt is claimed and run.

A finished attempt is checked first; then the executor's own journal (an attempt it finished or
was running when it stopped is answered from it, with the audit events the journal kept)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from confluent_kafka import Message

from fleetplane.core.events import (
    TaskCompleted,
    TaskFailed,
    TaskHeartbeat,
    TaskRolledBack,
    TaskStarted,
)
from fleetplane.core.follower import Follower
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import Output
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import LIFECYCLE, OUTCOMES

log = get_logger(__name__)

_CLAIMS = {b"TaskStarted", b"TaskHeartbeat"}
_OUTCOMES = {b"TaskCompleted", b"TaskFailed", b"TaskRolledBack"}
_TOPICS = (LIFECYCLE, OUTCOMES)


@dataclass(frozen=True)
class Lease:
    executor_id: str
    expires_ms: int
    done: bool = False  # the attempt has an outcome (completed, failed, rolled back)
    #: of a done attempt: the most audit events an outcome of it claims (the coordinator's
    #: lost_executor declaration claims none: the attempt's chain is then not reported yet)
    audit_count: int = 0

    def live(self, now_ms: int | None = None) -> bool:
        return self.expires_ms > (now_ms if now_ms is not None else int(time.time() * 1000))


class LeaseTable:
    """The fleet's attempt claims, (task_id, attempt) -> Lease, from tasks.lifecycle."""

    def __init__(self, settings: Settings, executor_id: str, lookback_s: float = 600.0) -> None:
        self.settings = settings
        self.executor_id = executor_id
        self.lookback_s = lookback_s
        self.ready = threading.Event()
        self._leases: dict[tuple[str, int], Lease] = {}
        self._lock = threading.Lock()
        self._serde = default_serde()
        self._last_prune = time.monotonic()
        #: the latest heartbeat of each task, undecoded: the fleet's heartbeats are most of
        #: what this reader sees (one per running attempt every executor_heartbeat_s, 1,000/s
        #: for 2,000 attempts) and a lookup happens once per dispatch, so a heartbeat is
        #: decoded only when its task is looked up (a heartbeat renews the lease of the attempt
        #: that sent it; a later attempt's heartbeat supersedes it: the older attempt's lease
        #: then ends at its last decoded renewal, and it is judged expired, never run twice)
        self._beats: dict[str, bytes] = {}
        #: set once the committed outcomes of the lookback window are read (see follow())
        self.outcomes_ready = threading.Event()
        self._outcomes: Follower | None = None
        #: committed outcomes' event ids (read_committed) -> when they occurred (ms)
        self._outcome_ids: dict[str, int] = {}
        self._synced = False
        self._synced_at = 0.0  # monotonic time the last sync asked for the ends
        self._sync_lock = threading.Lock()

    def get(self, task_id: str, attempt: int) -> Lease | None:
        with self._lock:
            raw = self._beats.pop(task_id, None)
        if raw is not None:
            self._apply(raw)
        with self._lock:
            return self._leases.get((task_id, attempt))

    def note(self, task_id: str, attempt: int, executor_id: str, expires_ms: int) -> None:
        key = (task_id, attempt)
        with self._lock:
            old = self._leases.get(key)
            if old is not None and old.done:
                return
            if old is None or expires_ms >= old.expires_ms or old.executor_id != executor_id:
                self._leases[key] = Lease(executor_id, expires_ms)

    def finished(self, task_id: str, attempt: int, at_ms: int, audit_count: int = 0) -> None:
        key = (task_id, attempt)
        with self._lock:
            old = self._leases.get(key)
            if old is not None and old.done:
                audit_count = max(audit_count, old.audit_count)
            self._leases[key] = Lease(old.executor_id if old else "", at_ms, done=True,
                                      audit_count=audit_count)

    def follow(self, follower: Follower, outcomes: Follower) -> None:
        """Register the claims on the process's follower (read_uncommitted) and the outcomes on
        `outcomes` (a read_committed follower; the caller starts both): every partition of
        tasks.lifecycle and tasks.outcomes from `lookback_s` ago; `ready` and `outcomes_ready`
        once read."""
        reader = follower.follow("attempt-claims", _TOPICS, self.on_claim,
                                 since_s=self.lookback_s)
        self.ready = reader.ready
        done = outcomes.follow("attempt-outcomes", _TOPICS, self.on_outcome,
                               since_s=self.lookback_s)
        self.outcomes_ready = done.ready
        self._outcomes = outcomes

    def sync(self, timeout_s: float = 10.0, fresh: bool = False) -> None:
        """Once per process (the first caller waits, the others wait for it): read the committed
        outcomes up to the ends the topics have now. Called by the handler, i.e. after the
        loop's init_transactions fenced this executor's predecessor (same transactional id) and
        aborted its open transaction, whose end then moves.

        `fresh`: again, to the ends the topics have from this call on (callers that asked
        while a sync ran wait for the next one). After the loop rewound (a transaction that
        failed during a broker restart: its commit may have gone through on the broker all the
        same, and the new producer's init_transactions completes it), the dispatches read again
        are judged against the outcomes committed by then, not against what was read before
        the rewind (make chaos: 13 outcomes published twice, same event id)."""
        if self._outcomes is None or (self._synced and not fresh):
            return
        asked = time.monotonic()
        with self._sync_lock:
            if self._synced and (not fresh or self._synced_at >= asked):
                return
            started = time.monotonic()
            if not self._outcomes.caught_up(timeout_s):
                log.warning("committed outcomes not read to their end; judging by what was read",
                            timeout_s=timeout_s)
            self._synced, self._synced_at = True, started

    def drop_committed(self, outputs: list[Output]) -> list[Output]:
        """The loop's `before_retry`: a commit failed and is tried again; outcomes that are on
        the log all the same (the broker committed the transaction before the client saw the
        failure) are dropped, after a fresh read of the committed outcomes. Audit events stay
        (consumers deduplicate them by event id)."""
        if not any(isinstance(o, TaskCompleted | TaskFailed | TaskRolledBack) for o in outputs):
            return outputs
        self.sync(fresh=True)
        with self._lock:
            kept = [o for o in outputs if not (
                isinstance(o, TaskCompleted | TaskFailed | TaskRolledBack)
                and o.event_id in self._outcome_ids)]
        if len(kept) < len(outputs):
            log.warning("a failed commit's outcomes are on the log all the same: not "
                        "published again", dropped=len(outputs) - len(kept))
        return kept

    def on_claim(self, msg: Message) -> None:
        etype = dict(msg.headers() or []).get("event_type") or b""
        if etype not in _CLAIMS:
            return
        key = msg.key()
        if etype == b"TaskHeartbeat" and key:
            with self._lock:
                self._beats[key.decode(errors="replace")] = msg.value() or b""
            return
        self._apply(msg.value() or b"")

    def on_outcome(self, msg: Message) -> None:
        etype = dict(msg.headers() or []).get("event_type") or b""
        if etype in _OUTCOMES:
            self._apply(msg.value() or b"")

    def _apply(self, value: bytes) -> None:
        try:
            event = self._serde.decode(value)
        except Exception:  # dead-lettered by the topic's own consumers
            return
        at = int(event.occurred_at.timestamp() * 1000)
        if isinstance(event, TaskStarted | TaskHeartbeat) and event.lease_ms > 0:
            self.note(event.task_id, event.attempt, event.executor_id, at + event.lease_ms)
        elif isinstance(event, TaskCompleted | TaskFailed | TaskRolledBack):
            with self._lock:
                self._outcome_ids[event.event_id] = at
            self.finished(event.task_id, event.attempt, at,
                          getattr(event, "audit_count", 0) or 0)
        if time.monotonic() - self._last_prune > 60:
            self._last_prune = time.monotonic()  # before: _prune applies the heartbeats
            self._prune()

    def _prune(self) -> None:
        cutoff = int((time.time() - self.lookback_s) * 1000)
        with self._lock:
            beats = list(self._beats.items())
        for task_id, raw in beats:  # fold the heartbeats in (bounded: one per task)
            with self._lock:
                if self._beats.get(task_id) is raw:
                    del self._beats[task_id]
            self._apply(raw)
        with self._lock:
            for key in [k for k, v in self._leases.items() if v.expires_ms < cutoff]:
                del self._leases[key]
            for eid in [e for e, at in self._outcome_ids.items() if at < cutoff]:
                del self._outcome_ids[eid]
