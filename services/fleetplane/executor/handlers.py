"""Executor handler: run an admitted attempt (the agent loop) or roll one back.

`execute` is what core.loop's Processor calls for each TaskDispatched. What it returns (the
attempt's outcome, the subtasks it submits) is committed with the dispatch offset in one Kafka
transaction; what must be seen while it runs goes through the runtime's live channel (see
runtime.py and docs/executor.md for the reasoning)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from fleetplane.core import failures
from fleetplane.core.catalog import Catalog
from fleetplane.core.events import (
    Event,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskRolledBack,
    TaskStarted,
    derived_id,
)
from fleetplane.core.logging import get_logger, task_context
from fleetplane.core.loop import Record
from fleetplane.core.serde import Serde, default_serde
from fleetplane.core.settings import Settings
from fleetplane.executor.agent import Agent
from fleetplane.executor.chains import lost_report
from fleetplane.executor.leases import LeaseTable
from fleetplane.executor.models import ModelClients
from fleetplane.executor.runtime import Collect, Emitter, Journal, Running, Runtime
from fleetplane.executor.workspace import WorkspaceError, branch_name

log = get_logger(__name__)


class SeenDispatches:
    """Dispatch event ids this process already took (bounded, thread-safe), and which of them
    are still being handled.

    The coordinator is at-least-once: after a crash it may re-publish the dispatches of its last
    batch with the same event ids. Running one again would call the model twice: such a copy
    (another record) is dropped; the first one answers. The *same record* read again once its
    handling ended is a copy too while its answer is pending commit or committed (the parallel
    loop commits offsets only up to its lowest unfinished record and never drops a finished
    record's outputs, so a rebalance or a broker outage re-reads finished records). Only a
    record whose answer the loop dropped (a loop that rewinds after an aborted transaction)
    is answered again, from the journal and the leases like any redelivery; dropping that one
    left the dispatch without any answer (the 2,000-task chaos run's two stuck tasks)."""

    def __init__(self, capacity: int = 200_000) -> None:
        #: event id -> where its record was read (topic, partition, offset), if known
        self._ids: OrderedDict[str, tuple[str, int, int] | None] = OrderedDict()
        self._active: set[str] = set()
        #: records whose handling ended: answer not committed yet / committed (bounded)
        self._pending: dict[tuple[str, int, int], None] = {}
        self._committed: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def first_time(self, event_id: str, where: tuple[str, int, int] | None = None) -> bool:
        with self._lock:
            if event_id in self._ids:
                return False
            self._ids[event_id] = where
            self._active.add(event_id)
            if len(self._ids) > self._capacity:
                self._ids.popitem(last=False)
            return True

    def read_again(self, event_id: str, where: tuple[str, int, int] | None) -> bool:
        """Whether this is the same record as the first one, read again after its handling
        ended (a rewind), rather than a copy or a record still being handled."""
        with self._lock:
            return (where is not None and self._ids.get(event_id) == where
                    and event_id not in self._active and where not in self._pending
                    and where not in self._committed)

    def committed(self, records: list[Record]) -> None:
        """The loop committed the answers of `records`: read again (the parallel loop commits
        offsets only up to its lowest unfinished record, so a rebalance or an outage re-reads
        finished ones), they are copies, not answered again. The chaos run: 11 outcomes
        published twice, same event id, 0.7 s apart, the lease table's read of the committed
        outcomes notwithstanding."""
        with self._lock:
            for rec in records:
                if isinstance(rec, Record):
                    where = (rec.topic, rec.partition, rec.offset)
                    self._pending.pop(where, None)
                    self._committed[where] = None
            while len(self._committed) > self._capacity:
                self._committed.popitem(last=False)

    def answering(self, event_id: str) -> bool:
        """Whether this process took the dispatch `event_id` and its answer is being handled,
        pending commit or committed (not dropped by a rewind: that record is read again and
        answered then)."""
        with self._lock:
            if event_id not in self._ids:
                return False
            where = self._ids[event_id]
            return (where is None or event_id in self._active or where in self._pending
                    or where in self._committed)

    def handled(self, event_id: str) -> None:
        """The handling of the dispatch's first record ended: its answer is with the loop,
        which commits it or, when a commit fails, tries the same outputs again (the parallel
        loop never drops a finished record's outputs). Read again meanwhile, the record is a
        copy (quiet chaos run 4: an answer pending commit across a broker restart was
        answered again from the journal and both were committed)."""
        with self._lock:
            self._active.discard(event_id)
            where = self._ids.get(event_id)
            if where is not None and where not in self._committed:
                self._pending[where] = None


@lru_cache(maxsize=1)
def _default_runtime() -> Runtime:
    """For callers without a composition root (tests of the plain path): no live channel."""
    return Runtime(Settings(), "local")


def execute(catalog: Catalog, clients: ModelClients, executor_id: str, seen: SeenDispatches,
            event: Event, record: Record | None = None, *,
            runtime: Runtime | None = None, leases: LeaseTable | None = None) -> Iterable[Event]:
    """Run one dispatched attempt (or rollback). Output event ids derive from the dispatch's, so
    a repeat of the same dispatch yields the same events, which every consumer deduplicates.
    With `leases`, an attempt already claimed in the fleet is not run again (leases.py).
    An attempt `Starter.begin` claimed already (the loop's start hook) goes on from there."""
    if not isinstance(event, TaskDispatched):
        return []
    where = (record.topic, record.partition, record.offset) if record is not None else None
    rt = runtime or _default_runtime()
    if where is not None and (taken := rt.take_begun(where)) is not None:
        begun, owns = taken
        try:
            if isinstance(begun, BaseException):
                raise begun
            return begun if isinstance(begun, list) else _finish(begun, leases)
        finally:
            if owns:  # the first record of this dispatch id: its handling ends here
                seen.handled(event.event_id)
    result, _ = _start(catalog, clients, executor_id, seen, event, record, runtime, leases,
                       finish=True)
    assert isinstance(result, list)
    return result


class Starter:
    """The loop's start hook (`ParallelProcessor(begin=...)`): claims an attempt (slot, journal
    entry, TaskStarted) in the poll loop, for a burst all at once; `execute` then runs it in
    its slot thread. What the claim found to answer without running (a redelivery, a refusal)
    is answered there too."""

    def __init__(self, catalog: Catalog, clients: ModelClients, executor_id: str,
                 seen: SeenDispatches, runtime: Runtime, leases: LeaseTable | None = None,
                 serde: Serde | None = None) -> None:
        self.catalog, self.clients, self.executor_id = catalog, clients, executor_id
        self.seen, self.runtime, self.leases = seen, runtime, leases
        self.serde = serde or default_serde()

    def begin(self, record: Record) -> Event | None:
        """Claim the record's attempt; returns the decoded event (the loop hands it to the
        slot thread's handler instead of decoding the record again), None if undecodable."""
        try:
            event = self.serde.decode(record.value)
        except Exception:  # the slot thread's decode dead-letters it
            return None
        if not isinstance(event, TaskDispatched) or event.action == "rollback":
            return event  # a rollback runs git: all of it in its slot thread
        where = (record.topic, record.partition, record.offset)
        with task_context(event.task_id, event_type="TaskDispatched"):
            owns = True
            begun: Begun | list[Event] | BaseException
            try:
                begun, owns = _start(self.catalog, self.clients, self.executor_id, self.seen,
                                     event, record, self.runtime, self.leases, finish=False)
            except Exception as exc:  # raised again in the slot thread
                begun = exc
        self.runtime.put_begun(where, (begun, owns))
        return event


def _start(catalog: Catalog, clients: ModelClients, executor_id: str, seen: SeenDispatches,
           event: TaskDispatched, record: Record | None, runtime: Runtime | None,
           leases: LeaseTable | None, finish: bool) -> tuple[Begun | list[Event], bool]:
    """The dispatch checks and the claim; with `finish`, the attempt too (one thread). Also
    says whether this record is the dispatch's first (its handling's end must be noted)."""
    where = (record.topic, record.partition, record.offset) if record is not None else None
    if not seen.first_time(event.event_id, where):
        if not seen.read_again(event.event_id, where) or \
                (runtime or _default_runtime()).journal is None:
            log.warning("duplicate dispatch ignored", attempt=event.attempt)
            return [], False
        log.warning("dispatch read again after a rewind (its outputs were not committed): "
                    "answered as a redelivery", attempt=event.attempt)
        return _handle(catalog, clients, executor_id, seen, event, record, runtime, leases,
                       rewound=True, finish=finish), False
    return _handle(catalog, clients, executor_id, seen, event, record, runtime, leases,
                   finish=finish), True


@dataclass
class Begun:
    """An attempt claimed (slot, journal entry, TaskStarted emitted), not run yet."""

    catalog: Catalog
    clients: ModelClients
    executor_id: str
    event: TaskDispatched
    record: Record | None
    rt: Runtime
    run: Running
    emitter: Emitter
    started: TaskStarted
    base: dict[str, str]


def _handle(catalog: Catalog, clients: ModelClients, executor_id: str, seen: SeenDispatches,
            event: TaskDispatched, record: Record | None, runtime: Runtime | None,
            leases: LeaseTable | None, rewound: bool = False,
            finish: bool = True) -> Begun | list[Event]:
    if not finish:
        return _claim(catalog, clients, executor_id, seen, event, record, runtime, leases,
                      rewound)
    try:
        begun = _claim(catalog, clients, executor_id, seen, event, record, runtime, leases,
                       rewound)
        return begun if isinstance(begun, list) else _finish(begun, leases)
    finally:
        seen.handled(event.event_id)


def _claim(catalog: Catalog, clients: ModelClients, executor_id: str, seen: SeenDispatches,
           event: TaskDispatched, record: Record | None, runtime: Runtime | None,
           leases: LeaseTable | None, rewound: bool) -> Begun | list[Event]:
    rt = runtime or _default_runtime()
    if event.action == "rollback":
        return rollback(rt, event)
    journal = rt.journal
    previous = journal.read(event.task_id, event.attempt) if journal is not None else None
    if previous is not None and previous.get("dispatch") != event.event_id:
        # the same attempt dispatched again under another event id: the coordinator decided it
        # again after losing its record of the first dispatch (a broker that lost committed
        # writes: make chaos's SIGKILL), or after a transaction it took for aborted went
        # through. The attempt ran here already: never run (and billed) a second time
        first = str(previous.get("dispatch"))
        if seen.answering(first):
            # this process answers the first dispatch (pending commit or committed): the
            # journal's answer, published again, would be a second record of the outcome
            # (quiet chaos run Q7 of stop 17: 3 tasks completed twice, 1.2 s apart)
            log.warning("attempt dispatched again under another event id: not answered, "
                        "this process answers its first dispatch", attempt=event.attempt,
                        first=first)
            return []
        log.warning("attempt dispatched again under another event id: answered from the "
                    "journal", attempt=event.attempt, first=first)
    lease = leases.get(event.task_id, event.attempt) if leases is not None else None
    if leases is not None and (previous is not None or lease is not None):
        # a redelivered attempt: read the committed outcomes to their end first (once per
        # process), so one the previous incarnation committed is known (leases.sync); after a
        # rewind again: the failed transaction's commit may have gone through on the broker
        leases.sync(fresh=rewound)
        lease = leases.get(event.task_id, event.attempt)
    if lease is not None and lease.done:
        if previous is not None and _journal_audit_count(previous) > lease.audit_count:
            # the coordinator declared the attempt lost (its heartbeats stopped: this executor
            # was down) before the attempt was reported; its audit chain (real spend) is
            # reported now, as a non-final lost_executor the coordinator does not act on (the
            # 2,000-task chaos run: 4 audit chains no outcome vouched for)
            log.warning("attempt declared lost before it was reported: its audit chain is "
                        "reported now", attempt=event.attempt, claimed=lease.audit_count)
            return _answer_redelivery(rt, event, previous, lease_left_ms=-1)
        # a committed outcome exists: publishing the journal's again would be a second one
        log.info("dispatch not run: the attempt already has an outcome",
                 attempt=event.attempt, holder=lease.executor_id)
        return []
    if previous is not None:
        left = None if leases is None else (
            lease.expires_ms - int(time.time() * 1000) if lease is not None else -1)
        answer = _answer_redelivery(rt, event, previous, lease_left_ms=left)
        if any(isinstance(e, TaskCompleted) for e in answer):
            rt.hold_answer_until_committed(record, event.task_id, event.team, event.attempt)
        return answer
    if lease is not None:
        if lease.live() and lease.executor_id != executor_id:
            log.warning("dispatch not run: the attempt's lease is live on another executor",
                        attempt=event.attempt, holder=lease.executor_id)
            return []
        log.warning("dispatch not run: the attempt was claimed before and interrupted",
                    attempt=event.attempt, holder=lease.executor_id, live=lease.live())
        return _answer_redelivery(rt, event, {"state": "running"})
    if rt.cancelled(event.task_id):
        # cancelled before it started (the cancel came while the executor was starting, or
        # while the dispatch waited): refused without a slot, a journal entry, a claim or a
        # model call; nothing ran, so there is nothing to audit or to renew
        log.warning("attempt failed", failure_class=failures.CANCELLED,
                    reason="cancelled before it started", attempt=event.attempt)
        return [event.derive(TaskFailed, event_id=derived_id(event.event_id, "failed"),
                             attempt=event.attempt, failure_class=failures.CANCELLED,
                             reason="cancelled before it started", final=False)]
    emitter: Emitter = rt.live if rt.live is not None else Collect()
    run = rt.begin(event.task_id, event.team, event.attempt)
    base = {"dispatch": event.event_id, "state": "running"}
    try:
        started = event.derive(TaskStarted, attempt=event.attempt, executor_id=executor_id,
                               slot=run.slot.index, event_id=derived_id(event.event_id,
                                                                       "started"),
                               lease_ms=rt.lease_ms if rt.live is not None else 0)
        emitter.emit(started, keep=True)
    except BaseException:
        rt.end(run)
        raise
    return Begun(catalog, clients, executor_id, event, record, rt, run, emitter, started, base)


def _finish(b: Begun, leases: LeaseTable | None) -> list[Event]:
    """The claimed attempt: the claim's acknowledgement, the agent, the outcome."""
    catalog, clients, executor_id, event, record = (b.catalog, b.clients, b.executor_id,
                                                    b.event, b.record)
    rt, run, emitter, started, base = b.rt, b.run, b.emitter, b.started, b.base
    journal = rt.journal
    try:
        # the journal's entry is written here, in the slot thread, not with the claim (a file
        # create per attempt in the poll loop was a fifth of a burst's claim): before the
        # model is called, which is what it guards. Killed between the claim and this line,
        # the redelivery finds no journal but the claim (TaskStarted, this executor's id) and
        # reports the attempt lost; if the broker never took the claim, nothing ran
        if journal is not None:
            journal.write(event.task_id, event.attempt, base)
        if rt.live is not None and rt.lease_ms > 0 and rt.live.settle({started.event_id}):
            # the claim is not durable: do not call the model (a redelivery could run it twice)
            log.error("attempt not claimed: TaskStarted not acknowledged", attempt=event.attempt)
            return [started, event.derive(
                TaskFailed, event_id=derived_id(event.event_id, "failed"),
                attempt=event.attempt, failure_class=failures.LOST_EXECUTOR, final=False,
                reason="the executor could not claim the attempt (the broker did not "
                       "acknowledge TaskStarted); the model was not called")]
        agent = Agent(rt, catalog, clients, executor_id, event, emitter, run, base)
        outcome = agent.run()
    finally:
        rt.end(run)
    # the slot is free; the lease is renewed until the outcome's transaction commits
    rt.hold_until_committed(record, run)
    settled = leases.get(event.task_id, event.attempt) if leases is not None else None
    if settled is not None and settled.done:
        outcome = _superseded(event, outcome)
    if isinstance(emitter, Collect):
        result = [*emitter.events, *outcome]
    else:  # audit events the broker did not acknowledge go into the outcome's transaction
        result = [*rt.live.settle({started.event_id, *_audit_ids(agent)}), *outcome] \
            if rt.live is not None else list(outcome)
    if journal is not None:
        journal.write(event.task_id, event.attempt, {**base, "state": "done",
                                                     "audit": agent.audited,
                                                     "outcome": Journal.encode(outcome)})
    return result


#: a redelivered attempt's journal outcome is published as finished only if the attempt's
#: lease has at least this share of a lease left (else the coordinator may declare it lost
#: before the answer commits: two terminal records)
LEASE_MARGIN = 1 / 3


def _superseded(event: TaskDispatched, outcome: list[Event],
                reason: str = "the attempt completed after the coordinator had declared it "
                              "lost; the coordinator's decision stands (output discarded)"
                ) -> list[Event]:
    """The attempt finished, but its attempt already has a committed outcome that this process
    did not publish: the coordinator declared it lost (its heartbeats stopped for longer than
    the lease: the process was frozen, or cut off from the broker) and has retried it or ended
    the task. Its TaskCompleted would be a second terminal record for the task: it is reported
    as a non-final lost_executor instead, with its cost and audit chain (the spend was real and
    is audited once), and its subtasks are not submitted (they go with a completion only)."""
    done = next((e for e in outcome if isinstance(e, TaskCompleted)), None)
    if done is None:
        return outcome  # a TaskFailed is never final from the executor: the coordinator decides
    log.warning("attempt's outcome reported as lost_executor, not completed", reason=reason,
                attempt=event.attempt)
    return [lost_report(event.task_id, event.team, event.event_id, event.attempt, "superseded",
                        done.cost_usd, done.audit_head, done.audit_count, reason)]


def _journal_audit_count(previous: dict[str, object]) -> int:
    audit = previous.get("audit")
    return len(audit) if isinstance(audit, list) else 0


def _audit_ids(agent: Agent) -> set[str]:
    ids = {derived_id(agent.event.event_id, f"model-call-{i}") for i in range(agent.model_calls)}
    ids |= {derived_id(agent.event.event_id, f"tool-call-{i}") for i in range(agent.tool_calls)}
    ids.add(derived_id(agent.event.event_id, "workspace-change"))
    return ids


def _answer_redelivery(rt: Runtime, event: TaskDispatched, previous: dict[str, object],
                       lease_left_ms: int | None = None) -> list[Event]:
    """The dispatch came back after this executor stopped (its transaction was not committed).
    A finished attempt is answered with the same outcome; an interrupted one is reported as
    lost (its worktree was cleaned at start-up), never run a second time.

    A lease works like one: a finished attempt whose claim has expired, or is about to
    (`lease_left_ms` under LEASE_MARGIN of a lease; negative when the lease table knows no
    claim), is answered as a non-final lost_executor with its cost and audit chain, not as
    completed: the coordinator may have declared it lost and retried it already, or does so
    before this answer commits (the 2,000-task chaos run: 24 tasks completed twice, the
    restarted executor's answer landing a second after the declaration). None: no lease
    table, answered as finished."""
    # the attempt's audit events as well: live ones may not have reached the log (the process
    # was killed before the broker acknowledged them, or the broker lost them); consumers
    # deduplicate by event id
    audit = previous.get("audit")
    audited = Journal.decode(audit) if isinstance(audit, list) else []
    if previous.get("state") == "done":
        raw = previous.get("outcome")
        outcome = Journal.decode(raw) if isinstance(raw, list) else []
        if lease_left_ms is not None and lease_left_ms < rt.lease_ms * LEASE_MARGIN:
            outcome = _superseded(event, outcome, reason=(
                "the executor stopped before this attempt's outcome was committed, and the "
                "attempt's lease had expired or was about to when it came back; reported as "
                "lost (output discarded) so the coordinator's decision is the only one"))
        return [*audited, *outcome] if outcome else []
    if event.spec.repository:
        try:
            rt.workspaces.rollback(event.spec.repository, event.task_id, event.attempt,
                                   event.spec.ref)
        except WorkspaceError:
            log.warning("could not drop the interrupted attempt's branch", exc_info=True)
    head = str(previous.get("head") or "")
    count = int(str(previous.get("count") or 0))
    cost = float(str(previous.get("cost") or 0.0))
    return [*audited, lost_report(event.task_id, event.team, event.event_id, event.attempt,
                                  "failed", cost, head, count, reason="the executor stopped "
                                  "during this attempt; it was not re-run")]


def rollback(rt: Runtime, event: TaskDispatched) -> list[Event]:
    """action="rollback": undo attempt `event.attempt`'s workspace changes."""
    spec = event.spec
    if not spec.repository:
        return [event.derive(TaskRolledBack, event_id=derived_id(event.event_id, "rolled-back"),
                             attempt=event.attempt,
                             reason="the task has no repository: nothing to roll back")]
    try:
        done = rt.workspaces.rollback(spec.repository, event.task_id, event.attempt, spec.ref)
    except WorkspaceError as exc:
        log.error("rollback failed", reason=str(exc))
        return [event.derive(TaskFailed, event_id=derived_id(event.event_id, "rollback-failed"),
                             attempt=event.attempt, failure_class=failures.TOOL_ERROR,
                             reason=f"rollback of {branch_name(event.task_id, event.attempt)} "
                                    f"failed: {exc}", final=False)]
    log.info("attempt rolled back", attempt=event.attempt, reason=done.reason)
    return [event.derive(TaskRolledBack, event_id=derived_id(event.event_id, "rolled-back"),
                         attempt=event.attempt, reason=done.reason,
                         reverted_commit=done.reverted_commit, files=done.files)]
