"""What the executor process holds beside the loop: agent slots and their utilization, the live
(non-transactional) event channel, heartbeats, the cancellation watcher and the attempt journal.

The transaction decision (docs/executor.md): an attempt's outcome (TaskCompleted / TaskFailed /
TaskRolledBack, and the subtasks it submits) is returned to core.loop's Processor and committed
with the dispatch offset in one Kafka transaction. What must be visible while the attempt runs
(TaskStarted, TaskHeartbeat, ModelCall, ToolCall, WorkspaceChange, ExecutorUtilization) goes out
through `LiveEmitter`, an idempotent producer outside the transaction, with event ids derived from
the dispatch; the journal makes a redelivered dispatch report the interrupted attempt instead of
running it a second time.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from confluent_kafka import KafkaError, Message

from fleetplane.core.events import (
    EVENT_TYPES,
    Event,
    ExecutorUtilization,
    TaskCancelled,
    TaskHeartbeat,
)
from fleetplane.core.follower import Follower
from fleetplane.core.kafka import RenewingProducer, event_headers
from fleetplane.core.logging import get_logger
from fleetplane.core.serde import Serde, default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.teams import TeamsConfig, teams_for
from fleetplane.core.topics import OUTCOMES, key_for, topic_for
from fleetplane.executor.models import AsyncCalls
from fleetplane.executor.sandbox import Limits, Sandbox
from fleetplane.executor.workspace import Workspaces, load_repositories, safe_name

log = get_logger(__name__)


#: acknowledged audit events kept for their attempts' settle() (about 1 KiB each)
KEPT_MAX = 200_000
#: after a broker outage, audit events acknowledged this long before it are published again (the
#: embedded broker loses about the last second of acknowledged writes on SIGKILL; an outcome
#: settled before the outage was noticed, or committed before the crash, would otherwise claim
#: an audit event the log no longer has)
RESEND_WINDOW_S = 30.0
#: heartbeats and utilization records are published this many at a time (Runtime._spread)
EMIT_SLICE = 50


class Emitter(Protocol):
    def emit(self, event: Event, keep: bool = False) -> None: ...


class Collect:
    """Events kept for the outcome's transaction (no live channel: tests, live_events off)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event, keep: bool = False) -> None:
        self.events.append(event)


class LiveEmitter:
    """Publishes at once through an idempotent producer, outside the loop's transaction.

    `settle(ids)` waits for those events' acknowledgements and returns the ones that were not
    delivered, so the caller can put them into the outcome's transaction instead. An event
    emitted with ``keep=True`` (an attempt's TaskStarted and audit events) also counts as not
    delivered when the broker went away after acknowledging it: a broker that crashes loses
    the writes it acknowledged last (the embedded one does on SIGKILL), and an outcome
    committed after its restart would then claim audit events the log no longer has. Consumers
    deduplicate by event id, so the second copy of one that survived costs nothing."""

    def __init__(self, settings: Settings, serde: Serde | None = None) -> None:
        # a fatal error (a broker restart that lost the last sequence numbers) replaces the
        # client; what it had not delivered comes back from settle() as undelivered
        self._producer = RenewingProducer(
            {**settings.producer_config(), "linger.ms": settings.executor_live_linger_ms},
            on_error=self._on_error)
        self._serde = serde or default_serde()
        self._lock = threading.Lock()
        self._pending: dict[str, Event] = {}
        self._failed: dict[str, Event] = {}
        #: acknowledged events kept for settle(): event id -> (event, outages when acknowledged)
        self._acked: dict[str, tuple[Event, int]] = {}
        self._keep: set[str] = set()
        #: times the producer lost every broker connection (each could have cost acked writes)
        self._down = 0
        #: kept events acknowledged in the last RESEND_WINDOW_S: (monotonic ack time, event)
        self._recent: deque[tuple[float, Event]] = deque()
        #: outages already answered by re-publishing `_recent`, and when the count last moved
        #: (one outage can count several times while the client retries: answer it once, 1 s
        #: after it last moved)
        self._outages_answered = 0
        self._outages_seen = (0, 0.0)
        #: events re-published after an outage whose delivery failed: sent again on the next poll
        self._resend: list[Event] = []
        self.resent = 0
        #: settle() waiters per event id: [ids still unacknowledged, wake-up]
        self._waiters: dict[str, list[list[Any]]] = {}
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="live-poll", daemon=True)
        self._poller.start()

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            with self._lock:
                self._down += 1
            log.warning("live channel: every broker connection is down; acknowledged audit "
                        "events of running attempts go into their outcomes' transactions")

    @property
    def outages(self) -> int:
        """Broker outages and fatal errors seen (each could have cost acknowledged writes: a
        client replaced after OUT_OF_ORDER_SEQUENCE_NUMBER met a broker that lost them)."""
        return self._down + self._producer.renewals

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)
            self._after_outage()

    def _after_outage(self) -> None:
        """Publish again (same event ids: consumers deduplicate) the audit events acknowledged
        shortly before an outage, whatever became of their attempts: the outcome may already be
        committed, or settled before the outage was noticed, while the broker lost the event."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RESEND_WINDOW_S:
                self._recent.popleft()
            outages = self.outages
            if outages != self._outages_seen[0]:
                self._outages_seen = (outages, now)
            if outages > self._outages_answered and now - self._outages_seen[1] >= 1.0:
                self._outages_answered = outages
                again = {e.event_id: e for _, e in self._recent}
                again.update((e.event_id, e) for e in self._resend)
                self._resend = []
            elif self._resend:
                again = {e.event_id: e for e in self._resend}
                self._resend = []
            else:
                return
        if again:
            log.warning("live channel: publishing again the audit events acknowledged shortly "
                        "before a broker outage", events=len(again))
        for event in again.values():
            self.resent += 1

            def delivered(err: KafkaError | None, _msg: Message, event: Event = event) -> None:
                if err is not None:
                    with self._lock:
                        self._resend.append(event)

            self._send(event, delivered)

    def emit(self, event: Event, keep: bool = False) -> None:
        if not keep:
            self._send(event)
            return
        with self._lock:
            self._pending[event.event_id] = event
            if keep:
                self._keep.add(event.event_id)

        def delivered(err: KafkaError | None, _msg: Message, eid: str = event.event_id) -> None:
            with self._lock:
                ev = self._pending.pop(eid, None)
                if ev is not None:
                    if err is not None:
                        self._failed[eid] = ev
                    elif eid in self._keep:
                        self._acked[eid] = (ev, self.outages)
                        self._recent.append((time.monotonic(), ev))
                        if len(self._acked) > KEPT_MAX:  # attempts that ended by an exception
                            oldest = next(iter(self._acked))
                            self._acked.pop(oldest)
                            self._keep.discard(oldest)
                for box in self._waiters.pop(eid, []):
                    box[0] -= 1
                    if box[0] <= 0:
                        box[1].set()

        self._send(event, delivered)

    def _send(self, event: Event, on_delivery: Callable[..., None] | None = None) -> None:
        """Produce `event`; with no `on_delivery` (heartbeats, utilization: nobody settles
        them, a lost one is superseded by the next) no delivery report is tracked at all: at
        2,000 running attempts that is 1,000 callbacks a second saved, and a failed one no
        longer stays in `_failed` for good."""
        value, headers = self._serde.encode(event), event_headers(event)
        while True:
            try:
                if on_delivery is None:
                    self._producer.produce(topic_for(event), key=key_for(event), value=value,
                                           headers=headers)
                else:
                    self._producer.produce(topic_for(event), key=key_for(event), value=value,
                                           headers=headers, on_delivery=on_delivery)
                return
            except BufferError:  # the local queue is full: it drains as deliveries are served
                if threading.current_thread() is self._poller:
                    self._producer.poll(0.01)  # the re-send after an outage: serve them here
                else:
                    time.sleep(0.01)

    def settle(self, ids: set[str], timeout_s: float = 15.0) -> list[Event]:
        """Wait (one wake-up, from the delivery callback the poller thread serves) until the
        broker acknowledged `ids`; return those that were not delivered. (Each slot used to
        loop on producer.flush(0.05): with thousands of attempts starting, thousands of
        threads flushed one shared producer at once.)"""
        with self._lock:
            waiting = ids & self._pending.keys()
            done = threading.Event()
            box: list[Any] = [len(waiting), done]
            for eid in waiting:
                self._waiters.setdefault(eid, []).append(box)
        if waiting and not done.wait(timeout_s):
            with self._lock:
                for eid in waiting:
                    boxes = self._waiters.get(eid, [])
                    if box in boxes:
                        boxes.remove(box)
                    if not boxes:
                        self._waiters.pop(eid, None)
        with self._lock:
            # looked up by id, not by a scan: every attempt settles its claim while the others
            # of a burst are pending (a copy of all of them per settle was O(N^2) in the lock)
            undelivered = [e for eid in ids if (e := self._pending.pop(eid, None)
                                                if eid in self._pending
                                                else self._failed.pop(eid, None)) is not None]
            undelivered.sort(key=lambda e: e.occurred_at)  # published in the order they happened
            for eid in ids:
                kept = self._acked.pop(eid, None)
                if kept is not None and kept[1] < self.outages:
                    undelivered.append(kept[0])  # acknowledged before an outage: maybe lost
            self._keep.difference_update(ids)
        return undelivered

    def close(self) -> None:
        self._producer.flush(10)
        self._closed.set()
        self._poller.join(2)


class Slot:
    """One agent slot's time accounting for the current utilization window."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._lock = threading.Lock()
        self.window_start = time.monotonic()
        self.window_wall = datetime.now(UTC)
        self.model_s = self.tool_s = self.busy_s = 0.0
        self.busy_since: float | None = None
        self.attempts = 0

    def add(self, kind: str, seconds: float) -> None:
        with self._lock:
            if kind == "model":
                self.model_s += seconds
            else:
                self.tool_s += seconds

    def begin(self) -> None:
        with self._lock:
            self.busy_since = time.monotonic()
            self.attempts += 1

    def end(self) -> None:
        with self._lock:
            if self.busy_since is not None:
                self.busy_s += time.monotonic() - max(self.busy_since, self.window_start)
            self.busy_since = None

    def roll(self) -> dict[str, Any]:
        """The closing window's figures; a new window starts now."""
        with self._lock:
            now = time.monotonic()
            window = max(1e-9, now - self.window_start)
            busy = self.busy_s
            if self.busy_since is not None:
                busy += now - max(self.busy_since, self.window_start)
            busy = min(busy, window)
            figures = {"slot": self.index, "window_start": self.window_wall, "window_s": window,
                       "model_s": min(self.model_s, busy), "tool_s": min(self.tool_s, busy),
                       "busy_s": busy, "idle_s": window - busy, "attempts": self.attempts}
            self.window_start, self.window_wall = now, datetime.now(UTC)
            self.model_s = self.tool_s = self.busy_s = 0.0
            self.attempts = 1 if self.busy_since is not None else 0
            return figures


class SlotPool:
    def __init__(self, n: int) -> None:
        self.slots = [Slot(i) for i in range(max(1, n))]
        self._free = list(reversed(self.slots))
        self._cond = threading.Condition()

    def acquire(self) -> Slot:
        with self._cond:
            while not self._free:
                self._cond.wait()
            slot = self._free.pop()
        slot.begin()
        return slot

    def release(self, slot: Slot) -> None:
        slot.end()
        with self._cond:
            self._free.append(slot)
            self._cond.notify()


@dataclass
class Running:
    task_id: str
    team: str
    attempt: int
    slot: Slot
    cancel: threading.Event = field(default_factory=threading.Event)
    _waiters: set[threading.Event] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def request_cancel(self) -> None:
        """Set the cancel flag and wake whatever the attempt is waiting for."""
        self.cancel.set()
        with self._lock:
            waiters = list(self._waiters)
        for w in waiters:
            w.set()

    def wait(self, fut: Future[Any], timeout_s: float) -> None:
        """Block until `fut` is done, the attempt is cancelled, or `timeout_s` passed: one
        wake-up, no polling (thousands of attempts wait on model calls at once)."""
        wake = threading.Event()
        fut.add_done_callback(lambda _f: wake.set())
        with self._lock:
            self._waiters.add(wake)
        try:
            if not self.cancel.is_set():
                wake.wait(max(0.0, timeout_s))
        finally:
            with self._lock:
                self._waiters.discard(wake)


#: a journal file's name: `<task>-a<attempt>.json` (Journal._path)
_JOURNAL_NAME = re.compile(r"^(?P<task>.+)-a(?P<attempt>\d+)\.json$")


class Journal:
    """One small file per attempt (`<task>-a<n>.json`): started, audit head, outcome. A
    dispatch redelivered after a crash finds it and is answered from it instead of being run
    again.

    Appended, never rewritten: each write is one JSON line added with a single `write(2)` on
    an O_APPEND descriptor (an audit event adds itself and the chain's head, count and cost:
    `append_audit`), and `read` folds the lines in order. Before (stop 16) every audit event
    rewrote the whole state (every audit event so far) to a temporary file and renamed it:
    a file create, a rename and a JSON dump growing with the attempt, per model call.
    Durability is the same as before: once `write(2)` returns the line is in the kernel's page
    cache and survives the process (SIGKILL, OOM kill), which is what the journal-before-publish
    order needs (`Agent._audit`); not a power loss of the machine (no fsync, neither before nor
    now: docs/executor.md). A line torn by a crash of the machine is ignored when read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._prefix = os.path.join(str(root), "")

    def prune(self, older_than_s: float = 7 * 86_400) -> int:
        """Forget attempts older than a week (a redelivery comes within minutes)."""
        cutoff = time.time() - older_than_s
        removed = 0
        for f in self.root.glob("*.json"):
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    def _path(self, task_id: str, attempt: int) -> str:
        return f"{self._prefix}{safe_name(task_id)}-a{attempt}.json"

    @staticmethod
    def attempt_of(name: str) -> tuple[str, int] | None:
        """(task id, attempt) from a journal file's name (`_path`). Ingest's task ids are hex,
        their own file names; an id with characters a file name cannot hold
        (workspace.safe_name changes it) comes back changed."""
        m = _JOURNAL_NAME.match(name)
        return (m["task"], int(m["attempt"])) if m else None

    def read(self, task_id: str, attempt: int) -> dict[str, Any] | None:
        return self.read_path(self._path(task_id, attempt))

    @staticmethod
    def read_path(path: str) -> dict[str, Any] | None:
        """The state of the attempt whose file is `path`, its lines folded in order."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        state: dict[str, Any] = {}
        for line in lines:
            if not line:
                continue
            try:
                part = json.loads(line)
            except ValueError:
                continue  # a torn last line (the machine crashed mid-write)
            if not isinstance(part, dict):
                continue
            added = part.pop("audit+", None)
            state.update(part)
            if isinstance(added, list):
                state["audit"] = [*state.get("audit", []), *added]
        return state or None

    def write(self, task_id: str, attempt: int, data: dict[str, Any]) -> None:
        """Set these keys of the attempt's state (a key given replaces its value)."""
        self._append(task_id, attempt, data)

    def append_audit(self, task_id: str, attempt: int, event: dict[str, str],
                     **state: Any) -> None:
        """One audit event more (and the chain's new head, count, cost)."""
        self._append(task_id, attempt, {**state, "audit+": [event]})

    def _append(self, task_id: str, attempt: int, data: dict[str, Any]) -> None:
        # the newline first: a line torn by a crash of the machine is ended by the next write
        # instead of swallowing it
        line = b"\n" + orjson.dumps(data)  # (json.dumps: 5x the CPU, stop 22)
        fd = os.open(self._path(task_id, attempt), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    @staticmethod
    def encode(events: list[Event]) -> list[dict[str, str]]:
        return [{"type": type(e).__name__, "json": e.model_dump_json()} for e in events]

    @staticmethod
    def decode(raw: list[dict[str, str]]) -> list[Event]:
        return [EVENT_TYPES[r["type"]].model_validate_json(r["json"]) for r in raw]


class Runtime:
    """Shared by the executor's slots (one per process)."""

    def __init__(self, settings: Settings, executor_id: str, *, live: LiveEmitter | None = None,
                 teams: TeamsConfig | None = None, journal: Journal | None = None,
                 sandbox: Sandbox | None = None, workspaces: Workspaces | None = None) -> None:
        self.settings = settings
        self.executor_id = executor_id
        self.live = live
        self.teams = teams or teams_for(settings.teams_file)
        self.journal = journal
        self.sandbox = sandbox or Sandbox(Limits(
            timeout_s=settings.executor_command_timeout_s, cpu_s=settings.executor_command_cpu_s,
            memory_mb=settings.executor_command_memory_mb,
            file_mb=settings.executor_command_file_mb,
            max_pids=settings.executor_command_max_pids))
        root = settings.executor_workspaces_dir or settings.resolved_data_dir() / "worktrees"
        self.workspaces = workspaces or Workspaces(load_repositories(settings), root)
        self.slots = SlotPool(settings.executor_slots)
        #: model calls: coroutines on one asyncio loop (no thread per call in flight)
        self.calls = AsyncCalls()
        self._running: dict[str, Running] = {}
        #: claims made by the loop's start hook, by dispatch record, until a slot runs them
        self._begun: dict[tuple[str, int, int], object] = {}
        #: finished attempts whose outcome is not committed yet, by their dispatch record's
        #: id(): they keep heartbeating (see `hold_until_committed`); the record is kept in
        #: the value, so its id() is not reused while it is here
        self._uncommitted: dict[int, tuple[object, Running]] = {}
        #: set by the composition root once the loop reports its commits (`committed`)
        self.track_commits = False
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.watcher_ready = threading.Event()
        self._serde = default_serde()
        #: the attempt lease each TaskStarted claims and each heartbeat renews (leases.py)
        self.lease_ms = int(settings.executor_lease_s * 1000)
        #: called with the task id of a cancel whose attempt is not running here (the
        #: composition root moves a dispatch still waiting for a slot to the express lane)
        self.on_cancel: Callable[[str], object] | None = None

    # -- attempts ------------------------------------------------------------------------------
    def put_begun(self, where: tuple[str, int, int], begun: object) -> None:
        """An attempt the loop's start hook claimed (handlers.Starter), for its slot thread."""
        with self._lock:
            self._begun[where] = begun

    def take_begun(self, where: tuple[str, int, int]) -> Any:
        with self._lock:
            return self._begun.pop(where, None)

    def begin(self, task_id: str, team: str, attempt: int) -> Running:
        slot = self.slots.acquire()
        run = Running(task_id, team, attempt, slot)
        with self._lock:
            self._running[task_id] = run
            if task_id in self._cancelled:
                run.request_cancel()
        return run

    def end(self, run: Running) -> None:
        with self._lock:
            if self._running.get(run.task_id) is run:
                del self._running[run.task_id]
        self.slots.release(run.slot)

    def hold_until_committed(self, record: object | None, run: Running) -> None:
        """A finished attempt keeps heartbeating (its lease renewed) until the transaction
        holding its outcome commits (`committed`). Its slot is free already. Without this a
        commit that stalled longer than the lease (a broker restart, a slow transaction) made
        the coordinator declare a finished attempt lost_executor and run it again, and the
        late outcome was a second terminal record (the chaos run: duplicated 2, audit breaks
        23). Only when the loop reports its commits (`track_commits`); a process that dies
        stops heartbeating, as it should."""
        if record is None or not self.track_commits or self.live is None:
            return
        with self._lock:
            self._uncommitted[id(record)] = (record, run)

    def hold_answer_until_committed(self, record: object | None, task_id: str, team: str,
                                    attempt: int) -> None:
        """A redelivered attempt answered from the journal as finished: its lease is renewed
        from this process until the transaction holding the answer commits, as for an attempt
        that finished here (a restarted executor's first commit can take tens of seconds; the
        coordinator then declared the answered attempt lost and retried it: make chaos, two
        completions per such task)."""
        # the heartbeats read only the attempt's ids: no slot of its own (it holds none)
        self.hold_until_committed(record, Running(task_id, team, attempt, self.slots.slots[0]))

    def committed(self, records: list[Any]) -> None:
        """The loop committed the outputs of `records`: their attempts stop heartbeating."""
        with self._lock:
            for rec in records:
                self._uncommitted.pop(id(rec), None)

    def uncommitted(self) -> list[Running]:
        """Finished attempts whose outcome is not committed yet."""
        with self._lock:
            return [run for _, run in self._uncommitted.values()]

    def cancel(self, task_id: str) -> bool:
        """Stop the task's running attempt (and refuse to start it later). True if running."""
        with self._lock:
            self._cancelled[task_id] = None
            if len(self._cancelled) > 100_000:
                self._cancelled.popitem(last=False)
            run = self._running.get(task_id)
        if run is not None:
            run.request_cancel()
            log.info("cancelling running attempt", task_id=task_id, attempt=run.attempt)
            return True
        if self.on_cancel is not None:
            self.on_cancel(task_id)
        return False

    def cancelled(self, task_id: str) -> bool:
        """Whether a cancel for the task was read (it must not start)."""
        with self._lock:
            return task_id in self._cancelled

    def running(self) -> list[Running]:
        with self._lock:
            return list(self._running.values())

    # -- background threads --------------------------------------------------------------------
    def start(self, follower: Follower | None = None) -> None:
        """Heartbeats and utilization; with a follower, the cancellation reader (registered
        on it: the caller starts the follower)."""
        self._spawn("heartbeats", self._heartbeats)
        self._spawn("utilization", self._utilization)
        if follower is not None:
            self.watch_cancellations(follower)
        else:
            self.watcher_ready.set()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _heartbeats(self) -> None:
        interval = self.settings.executor_heartbeat_s
        due = time.monotonic() + interval
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            due = max(due + interval, time.monotonic())  # one sweep per interval, not drifting
            if self.live is None:
                continue
            # running attempts, and finished ones until their outcome is committed
            beating = {(r.task_id, r.attempt): r for r in [*self.uncommitted(), *self.running()]}
            self._spread(list(beating.values()), interval / 2, lambda run: TaskHeartbeat(
                task_id=run.task_id, team=run.team, attempt=run.attempt,
                executor_id=self.executor_id, lease_ms=self.lease_ms))

    def _spread(self, items: list[Any], span_s: float,
                event: Callable[[Any], Event] = lambda e: e) -> None:
        """Emit `event(item)` for each item, EMIT_SLICE at a time, the slices spread evenly over
        `span_s` (the next sweep's events come after this one's: heartbeats, utilization).

        In one go, the 2,000 heartbeats of 2,000 running attempts were a burst of 40-80 ms of
        CPU every 2 s in one thread holding the GIL, and the follower read them in one round:
        at a low CPU share (load 10-20) the burst lasted 0.5-1 s of wall, and a cancel that
        arrived in it was read 0.4-1.4 s late (docs/executor.md, stop 20)."""
        assert self.live is not None
        slices = [items[i:i + EMIT_SLICE] for i in range(0, len(items), EMIT_SLICE)]
        gap = span_s / len(slices) if slices else 0.0
        for n, part in enumerate(slices):
            if n and self._stop.wait(gap):
                return
            for item in part:
                self.live.emit(event(item))

    def utilization_events(self) -> list[ExecutorUtilization]:
        return [ExecutorUtilization(task_id="", team="", executor_id=self.executor_id,
                                    **slot.roll()) for slot in self.slots.slots]

    def _utilization(self) -> None:
        while not self._stop.wait(self.settings.executor_utilization_window_s):
            events = self.utilization_events()  # every slot's window ends now
            if self.live is not None:  # published over a tenth of the window (`_spread`)
                self._spread(events, self.settings.executor_utilization_window_s / 10)

    def watch_cancellations(self, follower: Follower) -> None:
        """Register the cancellation reader on the process's follower (core.follower): every
        partition of tasks.outcomes, from `executor_cancel_lookback_s` ago, so every executor
        sees every TaskCancelled. `watcher_ready` is set once that window is read.

        Why a cancel used to be missed (docs/executor.md, "Cancellation"):
        * it read `read_committed`: a transaction left open on a tasks.outcomes partition by a
          producer that died (SIGKILL) holds that partition's last stable offset until the broker
          aborts it (transaction.timeout.ms on Kafka; never on the embedded broker), so every
          cancel behind it was invisible. A TaskCancelled is the coordinator's deterministic
          decision from committed inputs (an aborted one is decided again, with the same event
          id), so acting on it before its transaction commits is safe: the follower reads
          `read_uncommitted`.
        * it was assigned at OFFSET_END, resolved asynchronously after "watching" was logged,
          and started only when the process was up: a cancel published while the executor was
          starting (or down, with the dispatch redelivered later) was never seen. The reader
          now starts at concrete offsets, `executor_cancel_lookback_s` back in time, and is
          ready only once it has read them."""
        reader = follower.follow("cancellations", [OUTCOMES], self.on_outcome,
                                 since_s=self.settings.executor_cancel_lookback_s)
        self.watcher_ready = reader.ready

    def on_outcome(self, msg: Message) -> None:
        """A tasks.outcomes record: a TaskCancelled stops the task's attempt."""
        if (dict(msg.headers() or []).get("event_type") or b"") != b"TaskCancelled":
            return
        try:
            event = self._serde.decode(msg.value() or b"")
        except Exception as exc:  # dead-lettered by the outcome topic's consumers
            log.warning("undecodable cancellation skipped", topic=OUTCOMES,
                        offset=msg.offset(), reason=str(exc)[:300])
            return
        if isinstance(event, TaskCancelled):
            self.cancel(event.task_id)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(3)
        self.calls.close()
        if self.live is not None:
            for e in self.utilization_events():
                self.live.emit(e)
            self.live.close()
