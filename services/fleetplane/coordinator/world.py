"""The scheduler's view of every task, kept in memory next to the table it mirrors.

The scheduler table (one partition) is the source of truth; ``World`` is loaded from it after
each recovery and written back through ``take_rows`` after every batch. It keeps the indexes
admission needs (active tasks with their leases, waiting tasks, dependents) up to date on every
``put``, and an undo log so that one event's changes can be discarded when deciding it fails.
"""

from __future__ import annotations

import gc
import heapq
import json
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta

from fleetplane.coordinator.globs import literal_prefix
from fleetplane.coordinator.state import FleetState, Status, TaskRow
from fleetplane.core.events import TaskSpec

WILD = "*"  # lease bucket of globs whose first segment is not literal

PRIORITY_RANK = {"critical": 0, "high": 1, "normal": 2, "low": 3}

TASK_PREFIX = b"task/"
BEAT_PREFIX = b"beat/"  # a running task's latest heartbeat, newer than its task/ row
SPEC_PREFIX = b"spec/"  # a large spec, written once: its task/ rows are written without it
#: a spec whose JSON is longer than this goes into a spec/ record of its own (written once,
#: deleted when the task ends: two records) instead of into each of the task's rows (about
#: four whole-row writes per task after coalescing; smaller specs cost less inline)
SPEC_APART_BYTES = 400
FLEET_KEY = b"fleet"

def settle_heap() -> None:
    """After a table is loaded into a ``World``: the rows live as long as the process, so they
    are moved out of the collector's sight (``gc.freeze``: a full collection over 100,000 rows
    paused decisions for tens of ms). The collector's thresholds are left as they are: raising
    generation 0 from 700 to 50,000 turned 93 collections into 3 on the scale bench but cut
    their CPU only from 0.236 to 0.207 s (a few large collections cost the time, not many
    young ones), with pauses of about 70 ms each (docs/coordinator.md, round 4)."""
    gc.freeze()


def task_key(task_id: str) -> bytes:
    return TASK_PREFIX + task_id.encode()


def beat_key(task_id: str) -> bytes:
    return BEAT_PREFIX + task_id.encode()


def spec_key(task_id: str) -> bytes:
    return SPEC_PREFIX + task_id.encode()


def with_spec(data: bytes, spec: bytes) -> bytes:
    """A row's JSON without its spec, with the spec's JSON put in: what ``TaskRow.to_bytes``
    writes (a row has fields: never ``{}``)."""
    return data[:-1] + b',"spec":' + spec + b"}"


#: task id -> (the spec, its JSON, whether it is in a spec/ record): what the table holds
SpecsWritten = dict[str, tuple[TaskSpec, bytes, bool]]


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _at(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text is not None else None


def beat_bytes(state: TaskRow) -> bytes:
    """What a heartbeat changes in a running task's row (about 110 bytes with its key; the
    whole row, with its spec and the last 32 event ids, is 1-3 KB): written instead of the
    row. The lease end is written as microseconds after the heartbeat (``d``), and the row's
    ``updated_at`` only when it is not the heartbeat's time (``u``): a heartbeat usually sets
    both from its own ``occurred_at``, so two of the three timestamps were repeats."""
    beat: dict[str, object] = {"a": state.attempt, "x": state.executor_id,
                               "h": _iso(state.last_heartbeat_at)}
    heard, lease = state.last_heartbeat_at, state.lease_until
    if heard is not None and lease is not None:
        beat["d"] = (lease - heard) // timedelta(microseconds=1)
    else:
        beat["l"] = _iso(lease)
    if state.updated_at != heard:
        beat["u"] = _iso(state.updated_at)
    return json.dumps(beat, separators=(",", ":")).encode()


def with_beat(state: TaskRow, data: bytes) -> TaskRow:
    """The row with its latest heartbeat applied (a beat of another attempt is ignored)."""
    beat = json.loads(data)
    if beat.get("a") != state.attempt or state.status is not Status.RUNNING:
        return state
    heard = _at(beat.get("h"))
    lease = heard + timedelta(microseconds=beat["d"]) if "d" in beat and heard is not None \
        else _at(beat.get("l"))
    updated = _at(beat["u"]) if "u" in beat else heard or state.updated_at
    return state.model_copy(update={"executor_id": beat.get("x"), "last_heartbeat_at": heard,
                                    "lease_until": lease, "updated_at": updated})


Rank = tuple[int, int, str]
HoldKey = tuple[str | None, str, str | None]  # (hold_kind, hold_reason, held_by)


def rank(state: TaskRow) -> Rank:
    """Admission order within a team: priority, then arrival, then task id."""
    prio = PRIORITY_RANK.get(state.spec.priority if state.spec else "normal", 2)
    return prio, state.seq, state.task_id


def hold_key(state: TaskRow) -> HoldKey:
    return state.hold_kind, state.hold_reason, state.held_by


#: hold kinds naming the task waited for (held_by): an active lease, or a reservation
WAITS_FOR_TASK = frozenset({"conflict", "reserved"})


def _reserving(state: TaskRow) -> bool:
    """A waiter held by a conflict, passed over (the lease it waits for was admitted after it
    began to wait): it may hold its repository's reservation. A task waiting only for leases
    older than its wait is not starving, and reserves nothing (its wait is bounded already,
    and a reservation would make younger work wait for those leases too)."""
    return state.status is Status.WAITING and state.hold_kind == "conflict" and state.ready \
        and state.passed_over


def _due(state: TaskRow) -> float:
    return state.not_before.timestamp() if state.not_before is not None else float("-inf")


class World:
    def __init__(self) -> None:
        self.tasks: dict[str, TaskRow] = {}
        self.fleet = FleetState()
        self.active: dict[str, TaskRow] = {}  # dispatched, running, rolling back
        self.waiting: dict[str, TaskRow] = {}
        self.dependents: dict[str, set[str]] = {}  # dependency id -> waiting task ids
        self.running: Counter[str] = Counter()  # team -> active tasks
        # admission candidates: waiting, ready, and not held by an overlapping active lease
        self.candidates: dict[str, TaskRow] = {}
        self.conflict_waiters: dict[str, set[str]] = {}  # active holder -> tasks it blocks
        self.recheck: set[str] = set()  # conflict-held tasks whose holder is no longer active
        # repository -> first literal segment of a leased glob (or WILD) -> task id -> state
        self.leases: dict[str, dict[str, dict[str, TaskRow]]] = {}
        self.lease_versions: dict[str, int] = {}  # repository -> leases taken in it so far
        # incremental admission (see Scheduler._admit): per team, the admission queue
        # (candidates and recheck tasks) as a sorted list of ranks, and the candidates grouped
        # by the hold they last reported, so that a pass only looks at the tasks whose hold
        # would change; backoffs as a heap by due time (stale entries skipped when popped)
        self.queues: dict[str, list[Rank]] = {}
        self.groups: dict[str, dict[HoldKey, set[str]]] = {}
        self._queued: dict[str, tuple[str, Rank, HoldKey | None]] = {}  # tid -> team, rank, group
        # team -> candidates in a group whose kind is not "quota": none, and a quota hold of
        # the team changes nobody (Scheduler._changing skips it without looking at a group)
        self.unquota: Counter[str] = Counter()
        self._kept: tuple[str, str, Rank] | None = None  # see _index
        self.backoffs: list[tuple[float, str]] = []
        # terminal tasks as a heap of (when the row was last written, epoch s; task id), for
        # forgetting them after the retention (forget_ended); entries go stale when a terminal
        # row is written again, and are checked against the row when popped
        self.ended: list[tuple[float, str]] = []
        self.terminal = 0  # terminal rows held
        self._gone: set[str] = set()  # forgotten since the last take_rows (tombstones)
        self.reservers: dict[str, list[tuple[int, str]]] = {}  # repository -> (seq, task id)
        self._bulk = False  # World.load: queues sorted and the heap built once, at the end
        self._dirty: set[str] = set()
        self._beats: set[str] = set()  # rows whose heartbeat changed (and nothing else)
        self._specs: SpecsWritten = {}  # see take_rows
        self._beat_keys: set[str] = set()  # tasks with a beat/ record in the table
        self._fleet_dirty = False
        self._undo: dict[str, TaskRow | None] | None = None
        self._undo_fleet: FleetState | None = None

    @classmethod
    def load(cls, rows: Iterable[tuple[bytes, bytes | None]]) -> World:
        """The world of the table's rows, indexes rebuilt (a restart, a standby taking over).
        Built in bulk: the garbage collector paused (100,000 rows allocate millions of objects
        and each full collection walks them all), queues sorted once at the end."""
        world = cls()
        world._bulk = True
        enabled = gc.isenabled()
        gc.disable()
        try:
            tasks: list[tuple[str, bytes]] = []
            beats: dict[str, bytes] = {}
            specs: dict[str, bytes] = {}
            for key, value in rows:
                if value is None:
                    continue
                if key == FLEET_KEY:
                    world.fleet = FleetState.from_bytes(value)
                elif key.startswith(TASK_PREFIX):
                    tasks.append((key[len(TASK_PREFIX):].decode(), value))
                elif key.startswith(BEAT_PREFIX):
                    beats[key[len(BEAT_PREFIX):].decode()] = value
                elif key.startswith(SPEC_PREFIX):
                    specs[key[len(SPEC_PREFIX):].decode()] = value
            for tid, value in tasks:
                spec = specs.get(tid)
                # a row of the former layout has its spec inline (and no spec/ record)
                row = TaskRow.from_bytes(value if spec is None else with_spec(value, spec))
                if spec is not None and row.spec is not None:
                    world._specs[tid] = (row.spec, spec, True)
                beat = beats.get(row.task_id)
                if beat is not None:
                    row = with_beat(row, beat)
                    world._beat_keys.add(row.task_id)
                world._index(row)
            for queue in world.queues.values():
                queue.sort()
            for heap in world.reservers.values():
                heapq.heapify(heap)
            heapq.heapify(world.backoffs)
            heapq.heapify(world.ended)
        finally:
            world._bulk = False
            if enabled:
                gc.enable()
        world._dirty.clear()
        return world

    # -- changes ---------------------------------------------------------------------------
    def put(self, state: TaskRow) -> None:
        if self._undo is not None and state.task_id not in self._undo:
            self._undo[state.task_id] = self.tasks.get(state.task_id)
        self._index(state)
        self._dirty.add(state.task_id)

    def beat(self, state: TaskRow) -> None:
        """A heartbeat of a running task: only ``last_heartbeat_at``, ``lease_until`` and
        ``updated_at`` changed (no index moves). ``take_rows`` writes a small ``beat/`` record
        for it instead of the whole row (unless the row changed otherwise too)."""
        tid = state.task_id
        if self._undo is not None and tid not in self._undo:
            self._undo[tid] = self.tasks.get(tid)
        self.tasks[tid] = state
        self.active[tid] = state
        for bucket in self._buckets(state):
            bucket[tid] = state
        self._beats.add(tid)

    def set_fleet(self, fleet: FleetState) -> None:
        if self._undo is not None and self._undo_fleet is None:
            self._undo_fleet = self.fleet
        self.fleet = fleet
        self._fleet_dirty = True

    def _index(self, state: TaskRow) -> None:
        tid = state.task_id
        old = self.tasks.get(tid)
        if old is not None and old.spec is not None:
            for dep in old.spec.depends_on:
                self.dependents.get(dep, set()).discard(tid)
        self.tasks[tid] = state
        if state.terminal and (old is None or not old.terminal):
            self.terminal += 1
            entry = (state.updated_at.timestamp(), tid)
            if self._bulk:
                self.ended.append(entry)
            else:
                heapq.heappush(self.ended, entry)
        elif old is not None and old.terminal and not state.terminal:
            self.terminal -= 1  # a rollback of the event that ended it (its heap entry goes stale)
        if old is not None and old.hold_kind in WAITS_FOR_TASK and old.held_by:
            self.conflict_waiters.get(old.held_by, set()).discard(tid)
        self.candidates.pop(tid, None)
        self.recheck.discard(tid)
        # its queue entry stays in the sorted list until we know whether it is queued again
        # at the same rank (a hold that changes: most puts of a queued task), which then
        # costs no list removal and insertion (``_enqueue``)
        self._kept = self._ungroup(tid)
        gone = self.active.pop(tid, None)
        if gone is not None:
            self.running[gone.team] -= 1
            for bucket in self._buckets(gone):
                bucket.pop(tid, None)
            if not state.status.active:
                self._release_waiters(tid)
        elif old is not None and _reserving(old) and not _reserving(state) \
                and not state.status.active:
            # no longer the oldest waiter it was: the tasks it reserved for are looked at again
            self._release_waiters(tid)
        self.waiting.pop(tid, None)
        if state.ready and state.spec is not None:
            if state.hold_kind in WAITS_FOR_TASK and state.held_by:
                self.conflict_waiters.setdefault(state.held_by, set()).add(tid)
                if state.held_by not in self.active and not (
                        state.hold_kind == "reserved" and self.is_reserving(state.held_by)):
                    self.recheck.add(tid)
                    self._enqueue(state, None)
            else:
                self.candidates[tid] = state
                self._enqueue(state, hold_key(state))
        if _reserving(state) and state.spec is not None:
            entry = (state.seq, tid)
            heap = self.reservers.setdefault(state.repository, [])
            if self._bulk:
                heap.append(entry)
            else:
                heapq.heappush(heap, entry)
        if state.status is Status.WAITING and state.hold_kind == "backoff":
            if self._bulk:
                self.backoffs.append((_due(state), tid))
            else:
                heapq.heappush(self.backoffs, (_due(state), tid))
        if state.status.active:
            self.active[tid] = state
            self.running[state.team] += 1
            for bucket in self._buckets(state, create=True):
                bucket[tid] = state
            # a lease taken (or re-indexed) in the repository: conflict verdicts of its
            # waiting tasks found clear before are stale (Scheduler._conflict)
            self.lease_versions[state.repository] = \
                self.lease_versions.get(state.repository, 0) + 1
        elif state.status is Status.WAITING:
            self.waiting[tid] = state
            if state.hold_kind == "dependency" and state.spec is not None:
                for dep in state.spec.depends_on:
                    self.dependents.setdefault(dep, set()).add(tid)
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == tid:  # not queued again: out of the list
            self._unlist(kept[1], kept[2])

    def _release_waiters(self, tid: str) -> None:
        for waiter in self.conflict_waiters.pop(tid, set()):
            row = self.tasks.get(waiter)
            if row is not None:
                self.recheck.add(waiter)
                self._enqueue(row, None)

    def forget_ended(self, before: float, max_rows: int, limit: int) -> list[str]:
        """Forget terminal tasks (row deleted, tombstone at the next ``take_rows``), oldest
        first: those whose row was last written before ``before`` (epoch s), and while more
        than ``max_rows`` terminal rows are held (0: no cap); at most ``limit``. The ids
        forgotten, in order. A terminal row holds no lease, queue entry or dependents (its
        dependents were re-examined when it ended), so only the row goes."""
        forgotten: list[str] = []
        heap, tasks = self.ended, self.tasks
        while heap and len(forgotten) < limit:
            when, tid = heap[0]
            over = max_rows > 0 and self.terminal > max_rows
            if when >= before and not over:
                break
            heapq.heappop(heap)
            row = tasks.get(tid)
            if row is None or not row.terminal:
                continue  # forgotten already, or a stale entry
            written = row.updated_at.timestamp()
            if written != when:  # written again since (a late cost charged): its real time
                heapq.heappush(heap, (written, tid))
                continue
            self.forget(tid)
            forgotten.append(tid)
        return forgotten

    def forget(self, tid: str) -> None:
        """Delete a terminal task's row (undone by ``rollback``)."""
        row = self.tasks.get(tid)
        assert row is not None and row.terminal, tid
        if self._undo is not None and tid not in self._undo:
            self._undo[tid] = row
        del self.tasks[tid]
        self.terminal -= 1
        self._dirty.discard(tid)
        self._beats.discard(tid)
        self._gone.add(tid)

    def is_reserving(self, tid: str) -> bool:
        row = self.tasks.get(tid)
        return row is not None and _reserving(row)

    def reserver(self, repository: str) -> TaskRow | None:
        """The repository's oldest waiter held by a conflict (earliest arrival): admission
        reserves its write scope (see Scheduler._reserved)."""
        heap = self.reservers.get(repository)
        while heap:
            seq, tid = heap[0]
            row = self.tasks.get(tid)
            if row is not None and row.seq == seq and _reserving(row) \
                    and row.repository == repository:
                return row
            heapq.heappop(heap)
        return None

    def _enqueue(self, state: TaskRow, group: HoldKey | None) -> None:
        """Into its team's admission queue; ``group``: its hold, for a candidate (None for a
        task to recheck: a conflict whose holder ended)."""
        tid = state.task_id
        key = rank(state)
        kept = self._kept
        if kept is not None and kept[0] == tid:  # re-indexed: its list entry is still there
            self._kept = None
            if kept[1:] != (state.team, key):
                self._unlist(kept[1], kept[2])
                self._list(state.team, key)
        else:
            self._unqueue(tid)
            self._list(state.team, key)
        if group is not None:
            self.groups.setdefault(state.team, {}).setdefault(group, set()).add(tid)
            if group[0] != "quota":
                self.unquota[state.team] += 1
        self._queued[tid] = (state.team, key, group)

    def _list(self, team: str, key: Rank) -> None:
        if self._bulk:
            self.queues.setdefault(team, []).append(key)
        else:
            insort(self.queues.setdefault(team, []), key)

    def _unlist(self, team: str, key: Rank) -> None:
        queue = self.queues[team]
        del queue[bisect_left(queue, key)]

    def _unqueue(self, tid: str) -> None:
        kept = self._ungroup(tid)
        if kept is not None:
            self._unlist(kept[1], kept[2])

    def _ungroup(self, tid: str) -> tuple[str, str, Rank] | None:
        """Out of the queue's index and its hold group; (tid, team, rank) of the entry left in
        the team's sorted list (for the caller to remove or re-use), or None if not queued."""
        entry = self._queued.pop(tid, None)
        if entry is None:
            return None
        team, key, group = entry
        if group is not None:
            members = self.groups[team][group]
            members.discard(tid)
            if not members:
                del self.groups[team][group]
            if group[0] != "quota":
                self.unquota[team] -= 1
        return tid, team, key

    def queued_rank(self, tid: str) -> Rank | None:
        entry = self._queued.get(tid)
        return entry[1] if entry is not None else None

    def due_backoffs(self, now: datetime) -> list[TaskRow]:
        """Waiting tasks whose backoff is due at ``now`` (taken off the heap)."""
        due: dict[str, TaskRow] = {}
        limit = now.timestamp()
        while self.backoffs and self.backoffs[0][0] <= limit:
            when, tid = heapq.heappop(self.backoffs)
            state = self.tasks.get(tid)
            if state is not None and state.status is Status.WAITING \
                    and state.hold_kind == "backoff" and _due(state) == when:
                due[tid] = state
        return [due[t] for t in sorted(due)]

    def _buckets(self, state: TaskRow, create: bool = False) -> list[dict[str, TaskRow]]:
        repo = self.leases.setdefault(state.repository, {}) if create \
            else self.leases.get(state.repository, {})
        out = []
        for glob in state.leased_paths:
            prefix = literal_prefix(glob)
            key = prefix[0] if prefix else WILD
            bucket = repo.setdefault(key, {}) if create else repo.get(key)
            if bucket is not None:
                out.append(bucket)
        return out

    def lease_holders(self, repository: str, scope: list[str]) -> list[TaskRow]:
        """Active tasks in the repository whose leases may overlap `scope` (a superset of the
        ones that do: same first literal segment, or a wildcard first segment on either side)."""
        repo = self.leases.get(repository)
        if not repo:
            return []
        found: dict[str, TaskRow] = {}
        for glob in scope:
            prefix = literal_prefix(glob)
            keys = [prefix[0], WILD] if prefix else list(repo)
            for key in keys:
                found.update(repo.get(key, {}))
        return [found[k] for k in sorted(found)]

    # -- one event as a unit ---------------------------------------------------------------
    def begin(self) -> None:
        self._undo, self._undo_fleet = {}, None

    def commit(self) -> None:
        self._undo, self._undo_fleet = None, None

    def rollback(self) -> None:
        undo, fleet = self._undo or {}, self._undo_fleet
        self._undo, self._undo_fleet = None, None
        for tid, old in undo.items():
            if old is None:
                gone = self.tasks.pop(tid, None)
                if gone is not None and gone.terminal:
                    self.terminal -= 1
                self.active.pop(tid, None)
                self.waiting.pop(tid, None)
                self.candidates.pop(tid, None)
                self.recheck.discard(tid)
                self._unqueue(tid)
                if gone is not None and gone.spec is not None:
                    for dep in gone.spec.depends_on:
                        self.dependents.get(dep, set()).discard(tid)
                self._dirty.discard(tid)
            else:
                self._gone.discard(tid)  # forgotten by this event: not any more
                self._index(old)
        if fleet is not None:
            self.fleet = fleet

    # -- persistence -----------------------------------------------------------------------
    def take_rows(self) -> list[tuple[bytes, bytes | None]]:
        """The rows changed since the last call, as (key, value) for the table (a ``None``
        value deletes the key): the whole row of each changed task, with its spec inline or,
        when the spec is large (``SPEC_APART_BYTES``), without it and the spec in a ``spec/``
        record written when new or changed (deleted when the row drops it: a terminal task);
        a ``beat/`` record for a task whose heartbeat alone changed (deleted again when its
        whole row is written)."""
        rows: list[tuple[bytes, bytes | None]] = []
        dirty, tasks = self._dirty, self.tasks
        for tid in sorted(dirty):
            row = tasks.get(tid)
            if row is None:
                continue
            head = row.model_dump_json(exclude_defaults=True, exclude={"spec"}).encode()
            spec = self._spec_json(row, rows)
            rows.append((task_key(tid), head if spec is None else with_spec(head, spec)))
            if tid in self._beat_keys:
                self._beat_keys.discard(tid)
                rows.append((beat_key(tid), None))
        if self._beats:
            for tid in sorted(self._beats - dirty):
                row = tasks.get(tid)
                if row is not None:
                    rows.append((beat_key(tid), beat_bytes(row)))
                    self._beat_keys.add(tid)
            self._beats.clear()
        for tid in sorted(self._gone):
            if tid in tasks:
                continue  # forgotten, then a late event wrote it again: written above
            rows.append((task_key(tid), None))
            if tid in self._beat_keys:
                self._beat_keys.discard(tid)
                rows.append((beat_key(tid), None))
            kept = self._specs.pop(tid, None)
            if kept is not None and kept[2]:
                rows.append((spec_key(tid), None))
        self._gone.clear()
        if self._fleet_dirty:
            rows.append((FLEET_KEY, self.fleet.to_bytes()))
        dirty.clear()
        self._fleet_dirty = False
        return rows

    def _spec_json(self, row: TaskRow, rows: list[tuple[bytes, bytes | None]]) -> bytes | None:
        """The spec's JSON to write inline in the row (None: no spec, or in its spec/ record);
        the spec/ record's write or deletion appended to ``rows`` when it changes. The JSON is
        kept from the previous write: a spec does not change while the task waits and runs
        (its rows are new copies that share it)."""
        tid, spec, specs = row.task_id, row.spec, self._specs
        kept = specs.get(tid)
        if spec is None:
            if kept is not None:
                del specs[tid]
                if kept[2]:
                    rows.append((spec_key(tid), None))
            return None
        if kept is None or kept[0] is not spec:
            data = spec.model_dump_json(exclude_defaults=True).encode()
            apart = len(data) > SPEC_APART_BYTES
            if apart and (kept is None or not kept[2] or kept[1] != data):
                rows.append((spec_key(tid), data))
            elif not apart and kept is not None and kept[2]:
                rows.append((spec_key(tid), None))
            kept = specs[tid] = (spec, data, apart)
        return None if kept[2] else kept[1]

    def held(self) -> list[TaskRow]:
        """Waiting tasks with the reason they wait (oldest first)."""
        return sorted((s for s in self.waiting.values()),
                      key=lambda s: (s.held_since or s.updated_at, s.task_id))
