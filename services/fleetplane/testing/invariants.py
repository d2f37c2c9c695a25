"""Check the brief's invariants from the event log: what an auditor can prove after the fact.

`read_log` reads every committed record of the task topics for a set of task ids (from the start,
read_committed, so aborted transactions are not counted); `check` turns that log into a `Verdict`:

* **lost**: a submission the caller was told was durable (HTTP 202/200) that never reached
  tasks.accepted or a TaskRejected;
* **stuck**: an accepted task without a terminal state;
* **duplicated**: a task with more than one terminal event, or one terminal event delivered as
  more than one record;
* **double effects**: an attempt with two model calls at the same call index, two workspace
  commits, or a rollback reverting twice (invariant 2);
* **lease overlaps**: two attempts in one repository whose write scopes overlap and whose
  dispatch-to-end intervals overlap (invariant 3);
* **quota breaches**: a team with more attempts running at once than its `max_running`
  (invariant 4);
* **audit breaks**: an attempt outcome whose audit hash chain (audit_head, audit_count) does not
  match the ModelCall / ToolCall / WorkspaceChange events on the topics (invariant 8).

Everything here is pure except `read_log` (a consumer on the real broker).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from fleetplane.coordinator.globs import scope_overlap
from fleetplane.core import auditchain
from fleetplane.core import events as ev
from fleetplane.core.settings import Settings
from fleetplane.core.topics import (
    ACCEPTED,
    DISPATCH,
    LIFECYCLE,
    MODEL_CALLS,
    OUTCOMES,
    TOOL_CALLS,
    WORKSPACE,
)
from fleetplane.stream import read_to_end

LOG_TOPICS = (ACCEPTED, DISPATCH, LIFECYCLE, OUTCOMES, MODEL_CALLS, TOOL_CALLS, WORKSPACE)


@dataclass
class Log:
    """The committed records of the task topics for some tasks, in topic order per partition."""

    records: list[tuple[str, ev.Event]] = field(default_factory=list)  # (topic, event)
    undecodable: int = 0

    def of(self, *types: type[ev.Event]) -> list[ev.Event]:
        return [e for _, e in self.records if isinstance(e, types)]


def read_log(settings: Settings, wanted: Callable[[str], bool],
             topics: Iterable[str] = LOG_TOPICS, timeout_s: float = 120.0) -> Log:
    """Every committed record of `topics` whose key (the task id) satisfies `wanted`, read from
    the beginning up to each partition's end at the time of the call (fleetplane.stream)."""
    log = Log()
    for rec in read_to_end(settings, topics, wanted=wanted, timeout_s=timeout_s):
        if rec.event is None:
            log.undecodable += 1  # another test's garbage on a shared broker
        else:
            log.records.append((rec.topic, rec.event))
    return log


Interval = tuple[datetime, datetime, ev.TaskDispatched]


def attempt_intervals(log: Log) -> tuple[list[Interval], list[str]]:
    """Each dispatched attempt from its TaskDispatched to the event that ended it (its outcome,
    a failure, an abandonment or a cancel; a rollback holds its lease until it is done), and the
    attempts that never ended."""
    ends: dict[tuple[str, int], datetime] = {}
    for _, e in log.records:
        if isinstance(e, ev.TaskCompleted | ev.TaskRolledBack | ev.TaskFailed | ev.TaskAbandoned):
            key = (e.task_id, e.attempt)
            if isinstance(e, ev.TaskRolledBack) or key not in ends:
                ends[key] = e.occurred_at
    cancelled = {e.task_id: e.occurred_at for e in log.of(ev.TaskCancelled)}
    seen: set[tuple[str, int, str]] = set()
    out: list[Interval] = []
    open_: list[str] = []
    for e in log.of(ev.TaskDispatched):
        assert isinstance(e, ev.TaskDispatched)
        if (e.task_id, e.attempt, e.action) in seen:
            continue
        seen.add((e.task_id, e.attempt, e.action))
        end = ends.get((e.task_id, e.attempt)) or cancelled.get(e.task_id)
        if end is None:
            open_.append(f"{e.task_id}/a{e.attempt}/{e.action}")
            continue
        out.append((e.occurred_at, end, e))
    return out, open_


@dataclass
class Verdict:
    acknowledged: int = 0
    accepted: int = 0
    rejected: int = 0
    terminal: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    double_effects: list[str] = field(default_factory=list)
    lease_overlaps: list[str] = field(default_factory=list)
    quota_breaches: list[str] = field(default_factory=list)
    audit_breaks: list[str] = field(default_factory=list)
    audits_verified: int = 0
    attempts: int = 0
    model_calls: int = 0
    commits: int = 0
    max_running: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.stuck or self.duplicated or self.double_effects
                    or self.lease_overlaps or self.quota_breaches or self.audit_breaks)

    def counts(self) -> dict[str, int]:
        return {"lost": len(self.lost), "duplicated": len(self.duplicated),
                "stuck": len(self.stuck), "double_effects": len(self.double_effects),
                "lease_overlaps": len(self.lease_overlaps),
                "quota_breaches": len(self.quota_breaches),
                "audit_breaks": len(self.audit_breaks)}


def check(log: Log, acknowledged: set[str], quota: Callable[[str], int]) -> Verdict:
    """The verdict on `log` for the tasks whose submission was acknowledged; `quota(team)` is the
    team's max_running."""
    v = Verdict(acknowledged=len(acknowledged))
    accepted = {e.task_id for e in log.of(ev.TaskAccepted)}
    rejected = {e.task_id for e in log.of(ev.TaskRejected)}
    v.accepted, v.rejected = len(accepted), len(rejected - accepted)
    v.lost = sorted(acknowledged - accepted - rejected)

    terminal_ids: dict[str, set[str]] = defaultdict(set)
    terminal_records: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for topic, e in log.records:
        if topic == OUTCOMES and ev.is_terminal(e):
            if e.event_id not in terminal_ids[e.task_id]:
                kinds[type(e).__name__] += 1
            terminal_ids[e.task_id].add(e.event_id)
            terminal_records[e.task_id] += 1
    v.terminal = dict(kinds)
    v.stuck = sorted(t for t in accepted if t not in terminal_ids)
    v.duplicated = sorted(t for t, ids in terminal_ids.items()
                          if len(ids) > 1 or terminal_records[t] > 1)

    calls: dict[tuple[str, int, int], set[str]] = defaultdict(set)
    for e in log.of(ev.ModelCall):
        assert isinstance(e, ev.ModelCall)
        calls[(e.task_id, e.attempt, e.call_index)].add(e.event_id)
    v.model_calls = len(calls)
    v.double_effects += [f"{t}/a{a} model call {i} recorded {len(ids)} times"
                         for (t, a, i), ids in calls.items() if len(ids) > 1]
    commits: dict[tuple[str, int], set[str]] = defaultdict(set)
    for e in log.of(ev.WorkspaceChange):
        assert isinstance(e, ev.WorkspaceChange)
        if e.commit:
            commits[(e.task_id, e.attempt)].add(e.commit)
    v.commits = sum(len(c) for c in commits.values())
    v.double_effects += [f"{t}/a{a} committed {len(c)} times" for (t, a), c in commits.items()
                         if len(c) > 1]
    reverted: dict[tuple[str, int], set[str]] = defaultdict(set)
    for e in log.of(ev.TaskRolledBack):
        assert isinstance(e, ev.TaskRolledBack)
        if e.reverted_commit:
            reverted[(e.task_id, e.attempt)].add(e.event_id)
    v.double_effects += [f"{t}/a{a} reverted {len(r)} times" for (t, a), r in reverted.items()
                         if len(r) > 1]

    check_audit(log, v)
    intervals, open_ = attempt_intervals(log)
    v.attempts = len(intervals) + len(open_)
    v.stuck += [f"attempt {a} never ended" for a in open_
                if a.split("/", 1)[0] not in terminal_ids]
    by_repo: dict[str, list[Interval]] = defaultdict(list)
    for iv in intervals:
        if iv[2].spec.repository and iv[2].leased_paths:
            by_repo[iv[2].spec.repository].append(iv)
    for repo, ivs in by_repo.items():
        ivs.sort(key=lambda iv: iv[0])
        for i, (s1, e1, d1) in enumerate(ivs):
            for s2, e2, d2 in ivs[i + 1:]:
                if s2 >= e1:
                    break
                if d1.task_id != d2.task_id and s1 < e2 and scope_overlap(d1.leased_paths,
                                                                          d2.leased_paths):
                    v.lease_overlaps.append(f"{repo}: {d1.task_id}/a{d1.attempt} "
                                            f"{d1.leased_paths} and {d2.task_id}/a{d2.attempt} "
                                            f"{d2.leased_paths}")
    by_team: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    for start, end, d in intervals:
        if d.action == "run":
            by_team[d.team] += [(start, 1), (end, -1)]
    for team, points in by_team.items():
        running = peak = 0
        for _, delta in sorted(points, key=lambda p: (p[0], p[1])):  # ends before starts
            running += delta
            peak = max(peak, running)
        v.max_running[team] = peak
        if peak > quota(team):
            v.quota_breaches.append(f"{team}: {peak} running, quota {quota(team)}")
    return v


def check_audit(log: Log, v: Verdict) -> None:
    """Each attempt outcome's audit chain against the audit events on the topics. Events of one
    attempt sit on three topics, so they are put in order by following prev_hash from the start
    of the chain."""
    audit: dict[tuple[str, int], dict[str, auditchain.AuditEvent]] = defaultdict(dict)
    for e in log.of(ev.ModelCall, ev.ToolCall, ev.WorkspaceChange):
        assert isinstance(e, ev.ModelCall | ev.ToolCall | ev.WorkspaceChange)
        audit[(e.task_id, e.attempt)].setdefault(e.event_id, e)
    # the outcome that vouches for an attempt's chain is the executor's report: the one that
    # claims the most audit events. The coordinator's lost_executor declaration (heartbeats
    # stopped, lease expired) is a scheduling decision made without the attempt's events, so it
    # claims none; the executor reports the same attempt when it comes back or finishes (from
    # its journal, or as a superseded outcome). Audit events with no report claiming them stay a
    # break.
    reports: dict[tuple[str, int], ev.TaskCompleted | ev.TaskFailed] = {}
    for e in log.of(ev.TaskCompleted, ev.TaskFailed):
        assert isinstance(e, ev.TaskCompleted | ev.TaskFailed)
        if isinstance(e, ev.TaskCompleted) and e.cached:
            continue
        key = (e.task_id, e.attempt)
        if key not in reports or e.audit_count > reports[key].audit_count:
            reports[key] = e
    for key, e in reports.items():
        events = audit.get(key, {})
        by_prev = {a.prev_hash: a for a in events.values()}
        ordered: list[auditchain.AuditEvent] = []
        prev = ""
        while prev in by_prev and len(ordered) < len(events):
            ordered.append(by_prev[prev])
            prev = auditchain.event_hash(ordered[-1])
        ordered += [a for a in events.values() if a not in ordered]
        verdict = auditchain.verify(ordered, e.audit_head, e.audit_count)
        v.audits_verified += 1
        if not verdict.ok:
            v.audit_breaks.append(f"{e.task_id}/a{e.attempt}: {'; '.join(verdict.problems)}")
