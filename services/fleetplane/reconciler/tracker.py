"""What should be versus what is, per task: the reconciler's pure core.

Every non-terminal task waits at one hop for its next event:

* **ingest**: waits on a TaskSubmitted (tasks.submitted, group fleetplane-ingest); answered by
  a TaskAccepted or a TaskRejected.
* **router**: waits on a TaskAccepted (tasks.accepted, group fleetplane-router); answered by any
  routing outcome (TaskRouted, a cached TaskCompleted, TaskHeld for budget, TaskRejected,
  TaskFailed) or anything later.
* **coordinator**: waits on a TaskRouted (tasks.routed, group fleetplane-coordinator, the
  repartition step); answered by a row of the task in the coordinator's changelog, a
  TaskDispatched, a TaskHeld or a terminal state.

A hop is *overdue* when its consumer group's committed offset lies past the input record (the
service has read it and committed its outputs in the same transaction: the answer should be in
the log) and still nothing answered it ``deadline_s`` after the reconciler saw the record. Then
the reconciler re-drives it from the last durable fact: it re-publishes the input record as it
was (same bytes, same event id). Re-driving is idempotent downstream because every service
derives its output event ids from its input's event id (``events.derived_id``): the router's
TaskRouted for a re-published TaskAccepted has the id of the one that was lost, the coordinator
ignores an input whose event id it has applied (``TaskRow.seen``) and ClickHouse deduplicates by
event id. A group that has not read the record yet (a backlog, a service down) is not overdue:
that is a slow task, not a lost one, unless the group's committed offset has not moved for
``STALL_FACTOR`` deadlines while the record waits: a stalled consumer (make chaos: after the
broker's SIGKILL, the embedded broker answered the router's read_committed fetch from its
committed offset with the partition's end, so the router never read 90 accepted tasks and never
committed past them). Those records are re-driven as well.

After the coordinator has recorded a task, its own timers own it (an attempt dispatched but
never started, a running attempt whose lease expired: docs/coordinator.md); the reconciler does
not duplicate them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fleetplane.coordinator.topology import APP_ID, CHANGELOG
from fleetplane.core import events as ev
from fleetplane.core.topics import ACCEPTED, OUTCOMES, ROUTED, SUBMITTED

#: hop -> (input topic, consumer group that reads it). The groups are the services' default
#: ``fleetplane-<service>`` (core.loop.Processor); the coordinator's is its repartition step's;
#: the router's is ``FLEETPLANE_ROUTER_GROUP_ID`` (Reconciler.committed).
HOPS: dict[str, tuple[str, str]] = {
    "ingest": (SUBMITTED, "fleetplane-ingest"),
    "router": (ACCEPTED, "fleetplane-router"),
    "coordinator": (ROUTED, APP_ID),
}
#: the coordinator's state table (core.table.ChangelogTable): a row ``task/<id>`` is the
#: coordinator's durable fact that it recorded the task
COORDINATOR_CHANGELOG = CHANGELOG
#: the coordinator's schedule step reads SCHEDULER_TOPIC (one partition) in SCHEDULER_GROUP. The
#: repartition group having read a TaskRouted is evidence only once the schedule step has caught
#: up with what was forwarded: see Reconciler.committed
ROW_PREFIX = b"task/"
#: the longest wait between two re-drives of one hop of one task
BACKOFF_CAP_S = 600.0


@dataclass
class Fact:
    """An input record as it was read: enough to publish it again unchanged."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    event_id: str
    seen_at: float  # when the reconciler first read this record (its clock)
    attempt: int = 0


@dataclass
class Track:
    task_id: str
    team: str
    facts: dict[str, Fact] = field(default_factory=dict)  # hop -> its input record
    answered: set[str] = field(default_factory=set)  # hops whose answer is in the log
    redrives: dict[str, int] = field(default_factory=dict)  # hop -> re-drives so far
    gave_up: set[str] = field(default_factory=set)

    def waiting_at(self) -> str | None:
        """The hop the task waits at: the latest hop with a fact and no answer."""
        for hop in ("coordinator", "router", "ingest"):
            if hop in self.facts:
                return None if hop in self.answered else hop
        return None


@dataclass(frozen=True)
class Redrive:
    hop: str
    fact: Fact
    task_id: str
    team: str
    attempt: int  # re-drives of this hop of this task, this one included
    reason: str


@dataclass(frozen=True)
class GiveUp:
    hop: str
    task_id: str
    team: str
    reason: str


#: the hop an event answers, beside the hop its own record is the input of
_ANSWERS: dict[type[ev.Event], tuple[str, ...]] = {
    ev.TaskAccepted: ("ingest",),
    ev.TaskRejected: ("ingest", "router"),
    ev.TaskRouted: ("ingest", "router"),
    ev.TaskDispatched: ("ingest", "router", "coordinator"),
    ev.TaskStarted: ("ingest", "router", "coordinator"),
    ev.TaskHeartbeat: ("ingest", "router", "coordinator"),
    ev.TaskRetrying: ("ingest", "router", "coordinator"),
    ev.TaskEscalated: ("ingest", "router", "coordinator"),
    ev.TaskConflict: ("ingest", "router", "coordinator"),
}
_INPUT_OF: dict[type[ev.Event], tuple[str, str]] = {
    ev.TaskSubmitted: ("ingest", SUBMITTED),
    ev.TaskAccepted: ("router", ACCEPTED),
    ev.TaskRouted: ("coordinator", ROUTED),
}


#: a hop's group whose committed offset has not moved for STALL_FACTOR x the deadline (at least
#: STALL_MIN_S) while a record waits before it is stalled, not slow: its waiting records are
#: re-driven too (re-published at the partition's end, where a consumer stuck on a range the
#: broker will not serve reads them; idempotent downstream)
STALL_FACTOR = 4.0
STALL_MIN_S = 30.0


#: finished and recorded ids are kept this much longer than ``Tracker.memory_s`` (a pass reads
#: for at most 10 s: a task's fact and the record that answers it are read that far apart)
ID_MARGIN_S = 60.0


class Generations:
    """A set of ids kept for at least ``span_s`` and at most twice that: two generations, the
    older dropped when the newer is ``span_s`` old (``rotate``). Membership looks at both."""

    def __init__(self, span_s: float, now: float = 0.0) -> None:
        self.span_s = span_s
        self.current: set[str] = set()
        self.older: set[str] = set()
        self.since = now

    def add(self, item: str) -> None:
        self.current.add(item)

    def __contains__(self, item: object) -> bool:
        return item in self.current or item in self.older

    def __len__(self) -> int:
        """Ids held (one in both generations counts twice: no copy of the sets)."""
        return len(self.current) + len(self.older)

    def rotate(self, now: float) -> None:
        if self.span_s > 0 and now - self.since >= self.span_s:
            self.older, self.current, self.since = self.current, set(), now


class Tracker:
    """Per non-terminal task: its facts and answers. Terminal tasks are forgotten (their ids
    kept for ``memory_s``, so a late record does not bring them back), and so are tasks whose
    last fact is older than ``memory_s`` (``forget``): what a restart, which reads the topics
    from ``memory_s`` back, would not know either (docs/operations.md, "Reconciler")."""

    def __init__(self, memory_s: float = 0.0, now: float = 0.0) -> None:
        self.memory_s = memory_s  # 0: everything is kept
        self.tracks: dict[str, Track] = {}
        # the ids outlive a track by a margin: a fact and its answer can be read a pass apart
        span = memory_s + ID_MARGIN_S if memory_s > 0 else 0.0
        self.finished = Generations(span, now)
        # task ids with a row in the coordinator's table
        self.recorded = Generations(span, now)
        #: per (topic, partition) of a hop's input: the group's committed offset as last
        #: sampled, and since when it has not moved
        self.group_at: dict[tuple[str, int], tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self.tracks)

    def _track(self, task_id: str, team: str) -> Track | None:
        if not task_id or task_id in self.finished:
            return None
        track = self.tracks.get(task_id)
        if track is None:
            track = self.tracks[task_id] = Track(task_id, team)
        return track

    def observe(self, event: ev.Event, *, topic: str, partition: int, offset: int,
                key: bytes | None, value: bytes, headers: tuple[tuple[str, bytes], ...],
                now: float) -> None:
        """One record of a task topic, as read (in each partition's order)."""
        if ev.is_terminal(event) and topic == OUTCOMES:
            self.tracks.pop(event.task_id, None)
            self.finished.add(event.task_id)
            return
        if isinstance(event, ev.TaskFailed) and not event.final:
            # an attempt failed: the coordinator (or the router, for an unroutable task)
            # answered; retries and escalations are theirs
            hops: tuple[str, ...] = ("ingest", "router")
            if event.task_id in self.recorded:
                hops += ("coordinator",)
            self._answer(event, hops)
            return
        if isinstance(event, ev.TaskHeld):
            # held with a reason: the router (budget) or the coordinator decided; releasing it
            # is the holder's job
            self._answer(event, ("ingest", "router", "coordinator"))
            return
        if isinstance(event, ev.DeadLetter):
            # the hop's service refused its input with a reason (fleet.dlq): answered, not lost
            hop_of = {t: h for h, (t, _g) in HOPS.items()}.get(event.source_topic)
            if hop_of is not None:
                self._answer(event, (hop_of,))
            return
        if isinstance(event, ev.TaskCompleted):  # a cached completion on another topic
            self._answer(event, ("ingest", "router", "coordinator"))
            return
        hops = _ANSWERS.get(type(event), ())
        if hops:
            self._answer(event, hops)
        inp = _INPUT_OF.get(type(event))
        if inp is None or topic != inp[1]:
            return
        hop = inp[0]
        track = self._track(event.task_id, event.team)
        if track is None:
            return
        old = track.facts.get(hop)
        if old is not None and old.event_id == event.event_id and old.offset == offset \
                and old.partition == partition:
            return  # read again (a re-read after the broker reset our position)
        attempt = event.attempt if isinstance(event, ev.TaskRouted) else 0
        if old is not None and attempt < old.attempt:
            return
        if isinstance(event, ev.TaskRouted) and event.attempt > 1:
            # a re-route of a later attempt: the coordinator has the task already
            self.recorded.add(event.task_id)
        track.facts[hop] = Fact(topic, partition, offset, key, value, headers,
                                event.event_id, now, attempt)
        if hop == "coordinator" and event.task_id not in self.recorded:
            track.answered.discard("coordinator")

    def _answer(self, event: ev.Event, hops: tuple[str, ...]) -> None:
        track = self._track(event.task_id, event.team)
        if track is not None:
            track.answered.update(hops)

    def row(self, key: bytes | None, present: bool) -> None:
        """A record of the coordinator's changelog: ``task/<id>`` written (or deleted)."""
        if not key or not key.startswith(ROW_PREFIX):
            return
        task_id = key[len(ROW_PREFIX):].decode("utf-8", "replace")
        if present:
            self.recorded.add(task_id)
            track = self.tracks.get(task_id)
            if track is not None:
                track.answered.update(("ingest", "router", "coordinator"))

    def forget(self, now: float) -> int:
        """Drop what is older than ``memory_s``: tracks whose newest fact was read that long
        ago (the reconciler gave up on them or their answers were never read: a restart
        would not read their facts again), and a generation of finished and recorded ids.
        How many tracks went."""
        if self.memory_s <= 0:
            return 0
        self.finished.rotate(now)
        self.recorded.rotate(now)
        cutoff = now - self.memory_s
        old = [tid for tid, track in self.tracks.items()
               if max((f.seen_at for f in track.facts.values()), default=cutoff) <= cutoff]
        for tid in old:
            del self.tracks[tid]
        return len(old)

    def due(self, committed: Mapping[tuple[str, int], int], now: float, *,
            deadline_s: float, max_redrives: int) -> list[Redrive | GiveUp]:
        """The hops to re-drive now. ``committed``: (topic, partition) -> the committed offset
        of the hop's consumer group (sampled before the log was read to its end)."""
        out: list[Redrive | GiveUp] = []
        for track in self.tracks.values():
            hop = track.waiting_at()
            if hop is None:
                continue
            if hop == "coordinator" and track.task_id in self.recorded:
                continue
            fact = track.facts[hop]
            where = (fact.topic, fact.partition)
            read_up_to = committed.get(where, -1)
            stalled = False
            if where in committed:  # sampled (not a coordinator known to be behind)
                if self.group_at.get(where, (None, 0.0))[0] != read_up_to:
                    self.group_at[where] = (read_up_to, now)
                stall_s = max(STALL_FACTOR * deadline_s, STALL_MIN_S)
                stalled = now - self.group_at[where][1] >= stall_s \
                    and now - fact.seen_at >= stall_s
            if read_up_to <= fact.offset and not stalled:
                continue  # the hop's service has not read it yet: slow, not lost
            waited = now - fact.seen_at
            n = track.redrives.get(hop, 0)
            # the first re-drive after deadline_s, then backing off: deadline_s * 2^n, capped
            if waited < min(deadline_s * 2 ** n, max(deadline_s, BACKOFF_CAP_S)):
                continue
            if n >= max_redrives and hop not in track.gave_up:
                track.gave_up.add(hop)
                out.append(GiveUp(hop, track.task_id, track.team, (
                    f"{hop} read {fact.topic}[{fact.partition}]@{fact.offset} and never "
                    f"answered after {n} re-drives: an operator should look at this task "
                    f"(re-driven again every {BACKOFF_CAP_S:.0f}s at most)")))
            track.redrives[hop] = n + 1
            fact.seen_at = now  # the next deadline counts from the re-drive
            why = (f"which its group read (committed offset {read_up_to})"
                   if read_up_to > fact.offset else
                   f"which its group has not read: its committed offset {read_up_to} has not "
                   f"moved for {now - self.group_at[where][1]:.0f}s (a stalled consumer: "
                   "the embedded broker, after a SIGKILL, answered a read_committed fetch "
                   "from that offset with the partition's end)")
            out.append(Redrive(hop, fact, track.task_id, track.team, n + 1, (
                f"no answer from the {hop} {waited:.0f}s after {_kind(hop)} "
                f"{fact.event_id} ({fact.topic}[{fact.partition}]@{fact.offset}), {why}: "
                f"re-published it (re-drive {n + 1})")))
        return out


def _kind(hop: str) -> str:
    return {"ingest": "TaskSubmitted", "router": "TaskAccepted",
            "coordinator": "TaskRouted"}[hop]
