"""Workarounds for the pinned broker (noida-db 0.2.3) and faust-streaming 0.15.3.

Each was found by a test on the real broker (docs/coordinator.md, "Known problems"); each reaches
into a library's internals defensively and logs when it cannot.

1. Group membership (noida-db). A member that dies without LeaveGroup (SIGKILL) is never evicted,
   whatever its session timeout: a restarted dynamic member waits for a rebalance that never
   completes. The coordinator is therefore a static member (group.instance.id): its restart takes
   the dead member's place at once. A static member does not send LeaveGroup when it closes, so
   one that stops for good would block the group the same way; on a graceful stop the
   coordinator leaves explicitly (LeaveGroup by member id, which the broker honours).

2. Records lost around table recovery (faust). aiokafka fetches every assigned partition at
   once, input topics included, while faust recovers the table. Faust drops those records (the
   flow is suspended, or the partition is logically paused) but its read offset moves past them;
   after its seek to the committed offsets, re-fetched records are dropped as already read, and
   when a later record arrives faust books the hole as a "gap" and commits over it: the records
   are lost for good (faust-streaming issue #596 and relatives; reproduced here with a backlog
   at start). ``FetchGate`` pauses the input partitions in aiokafka itself when they are
   assigned and resumes them only after faust's seek to the committed offsets, so no input
   record is fetched before the bookkeeping is consistent. ``StallWatchdog`` is the safety net:
   a partition whose commit stalls behind the log is sought back to its committed offset
   (records processed twice are ignored: ``decide`` is idempotent).

3. Isolation level (faust). Faust reads read_committed only under exactly_once; the coordinator
   runs at_least_once but its inputs are written in Kafka transactions by the other services,
   so records of aborted transactions must stay invisible: ``FetchGate`` switches the aiokafka
   fetcher to read_committed before any input record is fetched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import READ_COMMITTED

from fleetplane.core.logging import get_logger

log = get_logger(__name__)


def _aiokafka_consumer(app: Any) -> Any:
    thread = getattr(app.consumer, "_thread", None)
    return getattr(thread, "_consumer", None)


def leave_group_on_close(app: Any) -> bool:
    """Make the app's aiokafka consumer send LeaveGroup when it closes (it skips that for static
    members). Returns False if aiokafka's layout is not the one this was written for."""
    coordinator = getattr(_aiokafka_consumer(app), "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_group_instance_id"):
        log.warning("cannot arrange LeaveGroup on close: unexpected aiokafka layout")
        return False
    coordinator._group_instance_id = None
    return True


class FetchGate:
    """Keeps input partitions paused in aiokafka from assignment until faust sought them to
    their committed offsets (after table recovery). Install once, before the worker starts."""

    def __init__(self, app: Any, on_open: Callable[[], Awaitable[None]] | None = None) -> None:
        self.app = app
        self.on_open = on_open  # called each time the inputs flow again (after a rebalance)
        self.gated: set[Any] = set()
        self._closed_generation: int | None = None  # generation whose inputs wait for the seek
        self._sought_generation: int | None = None  # generation faust last sought in

    def install(self) -> None:
        self.app.on_partitions_assigned.connect(self._on_assigned)

    async def _on_assigned(self, sender: Any, assigned: Any, **_: Any) -> None:
        await self._read_committed()
        consumer = self.app.consumer
        if getattr(consumer, "_fleetplane_gate", None) is not self:
            original = consumer.perform_seek

            async def perform_seek() -> None:
                await original()
                self._sought_generation = self.app.consumer_generation_id
                await self._open()

            consumer.perform_seek = perform_seek
            consumer._fleetplane_gate = self
        generation = self.app.consumer_generation_id
        changelogs = set(self.app.tables.changelog_topics)
        self.gated = {tp for tp in assigned if tp.topic not in changelogs}
        self._closed_generation = generation
        await self._call("pause", self.gated)
        if self._sought_generation == generation:  # recovery was faster than this handler
            await self._open()

    async def _read_committed(self) -> None:
        fetcher = getattr(_aiokafka_consumer(self.app), "_fetcher", None)
        if fetcher is None or not hasattr(fetcher, "_isolation_level"):
            log.warning("cannot switch to read_committed: unexpected aiokafka layout")
            return
        fetcher._isolation_level = READ_COMMITTED

    async def _open(self) -> None:
        if self._closed_generation is None:
            return  # nothing waits (e.g. faust's own re-seek while flowing)
        self._closed_generation = None
        gated, self.gated = self.gated, set()
        await self._call("resume", gated)
        if self.on_open is not None:
            await self.on_open()

    async def _call(self, method: str, tps: set[Any]) -> None:
        if not tps:
            return
        aio = _aiokafka_consumer(self.app)
        if aio is None:
            log.warning("cannot gate fetching: unexpected faust/aiokafka layout")
            return
        parts = [TopicPartition(tp.topic, tp.partition) for tp in tps]
        assigned = aio.assignment()

        async def call() -> None:  # runs on the consumer thread's event loop
            getattr(aio, method)(*[tp for tp in parts if tp in assigned])

        await self.app.consumer._thread.call_thread(call)


@dataclass
class _Progress:
    committed: int | None = None
    changed_at: float = 0.0
    wait_s: float = 0.0


@dataclass
class StallWatchdog:
    """Re-seeks stream partitions whose processing stalled behind their committed offset.

    ``saw(tp)`` is called for every record the agent processes; ``check()`` periodically. A
    partition counts as stalled when the broker holds records past its committed offset (more
    than one: a transaction marker may sit at the end), its committed offset did not move for
    ``stall_s`` and the agent processed nothing from it in that time. Each re-seek that does not
    help doubles the partition's wait (up to ``max_wait_s``)."""

    app: Any
    stall_s: float = 5.0
    max_wait_s: float = 60.0
    reseeks: int = 0
    _progress: dict[Any, _Progress] = field(default_factory=dict)
    _last_seen: dict[Any, float] = field(default_factory=dict)

    def saw(self, tp: Any) -> None:
        self._last_seen[tp] = time.monotonic()

    async def check(self) -> list[Any]:
        """Re-seek the stalled partitions; returns them."""
        app = self.app
        consumer = app.consumer
        if app.rebalancing or getattr(app.tables.recovery, "in_recovery", False) \
                or not getattr(consumer, "flow_active", True):
            return []
        now = time.monotonic()
        changelogs = set(app.tables.changelog_topics)
        stalled = []
        for tp in consumer.assignment():
            if tp.topic in changelogs:
                continue
            committed = consumer._committed_offset.get(tp)
            progress = self._progress.setdefault(tp, _Progress(committed, now, self.stall_s))
            if committed != progress.committed:
                self._progress[tp] = _Progress(committed, now, self.stall_s)
                continue
            end = _log_end(self.app, tp)
            behind = end is not None and end - (committed or 0) > 1
            quiet_since = max(progress.changed_at, self._last_seen.get(tp, 0.0))
            if behind and now - quiet_since >= progress.wait_s:
                stalled.append(tp)
                progress.changed_at = now
                progress.wait_s = min(self.max_wait_s, progress.wait_s * 2)
        for tp in stalled:
            offset = self._progress[tp].committed or 0
            log.warning("stalled partition: seeking back to its committed offset",
                        topic=tp.topic, partition=tp.partition, offset=offset,
                        log_end=_log_end(self.app, tp))
            await consumer.seek(tp, offset)
            self.reseeks += 1
        return stalled


def _log_end(app: Any, tp: Any) -> int | None:
    """The end of what a read_committed consumer can read (last stable offset)."""
    aio = _aiokafka_consumer(app)
    try:
        lso = aio.last_stable_offset(TopicPartition(tp.topic, tp.partition)) if aio else None
    except Exception:  # not fetched yet
        lso = None
    end = lso if lso is not None else app.consumer.highwater(tp)
    return int(end) if end is not None else None


_IDLE_BACKOFF_INSTALLED: list[float] = []


def install_idle_fetch_backoff(pause_s: float) -> None:
    """Back off after an empty fetch (process-wide; idempotent).

    The embedded broker answers a fetch with no records at once instead of holding it for
    fetch.wait.max.ms, and aiokafka then fetches again at once: an idle coordinator spun at about
    one core (0.5-0.9 CPU-s per second measured). After a fetch that brought nothing new, wait
    `pause_s` before that node's next fetch: at most that much added latency, no effect while
    records flow. Like aiokafka's own method, a cancelled wait returns False instead of raising
    (Fetcher.close awaits its cancelled fetch tasks)."""
    if pause_s <= 0 or _IDLE_BACKOFF_INSTALLED:
        return
    from aiokafka.consumer.fetcher import Fetcher

    original = Fetcher._proc_fetch_request

    async def proc_fetch_request(self: Any, assignment: Any, node_id: Any, request: Any) -> Any:
        has_new_data = await original(self, assignment, node_id, request)
        if not has_new_data and not self._closed:
            try:
                await asyncio.sleep(pause_s)
            except asyncio.CancelledError:
                return False
        return has_new_data

    Fetcher._proc_fetch_request = proc_fetch_request
    _IDLE_BACKOFF_INSTALLED.append(pause_s)
