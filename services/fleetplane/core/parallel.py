"""Continuous dispatch: a consume-transform-produce loop whose records finish out of order.

core.loop's Processor handles a fetched batch and fetches again when the whole batch is done: a
short record waits for the batch's slowest one (head-of-line blocking). That is right for the
services whose handlers take microseconds, wrong for the executor, whose handler runs an agent
for seconds to hours. `ParallelProcessor` is the pattern of Confluent's parallel consumer:

* the consumer keeps polling (every ``poll_timeout_s``, 50 ms at most) while records run, so the
  group membership stays alive without raising ``max.poll.interval.ms``;
* each record runs in one of ``slots`` slot threads as soon as one is free (the threads are
  started in the background when the loop starts, never by the poll loop: see `_spawner`); a
  slot thread that finishes takes the next waiting record itself (no wait for the poll loop);
* at most ``slots + prefetch`` records are held; when that is reached the loop pauses its
  assigned partitions (``consumer.pause``) and resumes them when a slot frees, polling all along
  (librdkafka keeps the application position, so a resumed partition continues where it was;
  a seek to that position makes it fetch at once, see `_pause`);
* finished records are committed together, every ``commit_interval_s`` (50 ms) as soon as one
  finished: their outputs and, per partition, the input offset up to (excluding) the lowest
  unfinished record, in one Kafka transaction (or, non-transactional: produce, flush, store);
  an aborted transaction is retried with the same outputs (nothing is rewound: records that
  finished are never handled twice by this process);
* on revocation, what finished is committed first (the partitions are still ours); records of
  the revoked partitions that have not started are dropped (the new owner reads them from the
  committed offset); attempts of those partitions that are running are left to finish: their
  outputs are still published, in a later transaction, without an input offset (the new owner's
  offset is its own). The new owner may then see the record again: the handler must be
  idempotent (the executor's is, by event id and its journal; see docs/executor.md);
* an express lane (``urgent``): records the owner flags as answered without long work (the
  executor: a dispatch whose task was cancelled before it started) are handled by one thread
  of their own, ahead of the queue and outside the slots, so they do not wait behind a burst
  or for a slot to free; `promote` moves a waiting record there later (a cancel read after
  the record was taken);
* a start hook (``begin``): the owner's cheap first step of a record (the executor: the
  attempt's claim), run by the poll loop for the records it takes while slots are free, all of
  them (and what else of the burst the client has fetched meanwhile, `_take_fetched`) before
  any slot thread is woken, so a burst onto empty slots is started in one thread
  instead of one GIL hand-off per slot thread (the first fill, docs/executor.md); a record a
  slot thread takes itself (a freed slot refilled) is begun by that thread. The event the
  hook returns (it decoded the record) is handed to the handler, not decoded a second time;
* parked while it works: once a take is begun, and before each commit, the loop parks its
  inputs (core.loop's IdleBackoff.park_for_work) unless it holds them paused; its next poll
  probes them at once. Assigned, the client fetched back to back through each take and
  commit of a burst (docs/benchmarks.md, stop 21);
* on stop (SIGTERM) the loop stops taking records, waits up to ``drain_timeout_s`` for the
  running ones while it keeps committing, and closes. Records still running then are not
  committed: they are redelivered to the next owner.

Errors follow core.loop: the handler's Retriable/NotRetriable handling and DLQ are the
Processor's (`_handle_one`); a Fatal in a worker stops the loop without committing it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from fleetplane.core.errors import Fatal
from fleetplane.core.events import Event
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import (
    TXN_CALL_TIMEOUT_S,
    Handler,
    Output,
    Processor,
    Record,
    records_of,
)
from fleetplane.core.settings import Settings

log = get_logger(__name__)

TP = tuple[str, int]

#: Consecutive failed commits before the loop gives up (Fatal).
MAX_COMMIT_TRIES = 10


@dataclass
class Item:
    record: Record
    epoch: int  # the partition's assignment epoch when the record was taken
    taken_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    begun: bool = False  # the begin hook ran (by the poll loop, when a slot was free)
    event: Event | None = None  # what the begin hook decoded (the slot thread does not again)


@dataclass
class Finished:
    item: Item
    outputs: list[Output]


@dataclass
class Stats:
    """What the loop saw (for benches and tests)."""

    taken: int = 0
    started: int = 0
    finished: int = 0
    committed: int = 0
    peak_running: int = 0
    pauses: int = 0
    commits: int = 0
    dropped_on_revoke: int = 0
    #: records handled in the express lane (outside the slots)
    express: int = 0
    #: seconds from taking a record to starting it, for records taken while a slot was free
    #: (the latest 10,000)
    start_delays: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))


class ParallelProcessor(Processor):
    """Processor whose records run in ``slots`` worker threads and finish out of order."""

    def __init__(self, service: str, topics: Sequence[str], handler: Handler,
                 settings: Settings, *, slots: int, prefetch: int | None = None,
                 drain_timeout_s: float = 10.0,
                 on_committed: Callable[[list[Record]], None] | None = None,
                 before_retry: Callable[[list[Output]], list[Output]] | None = None,
                 urgent: Callable[[Record], bool] | None = None,
                 begin: Callable[[Record], Event | None] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("commit_interval_s", 0.05)
        #: called after each successful commit with the records whose outputs it committed
        #: (the executor renews a finished attempt's lease until then: docs/executor.md)
        self.on_committed = on_committed
        #: called with each record's outputs before a failed commit is tried again: a commit
        #: that failed during a broker restart may have gone through on the broker all the same
        #: (make chaos: the same TaskCompleted twice); the executor drops the outcomes its
        #: read_committed follower finds committed
        self.before_retry = before_retry
        #: records answered without long work, handled in the express lane (see the module)
        self.urgent = urgent
        #: a record's cheap first step, run before its slot thread handles it (see the module)
        self.begin = begin
        super().__init__(service, topics, handler, settings, concurrency=1, **kwargs)
        self.slots = max(1, slots)
        self.prefetch = max(1, min(self.slots, settings.batch_size)
                            if prefetch is None else prefetch)
        self.drain_timeout_s = drain_timeout_s
        self.poll_timeout_s = min(settings.poll_timeout_s, 0.05)
        self.stats = Stats()
        self._lock = threading.Lock()
        self._queue: deque[Item] = deque()
        self._express: deque[Item] = deque()
        #: records given a slot (counted in _active) and begun by the poll loop, for the slots
        self._ready: deque[Item] = deque()
        self._active = 0
        self._unfinished: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}  # per owned partition: last taken offset + 1
        self._committed: dict[TP, int] = {}
        self._epoch: dict[TP, int] = {}
        self._done: list[Finished] = []
        self._fatal: BaseException | None = None
        self._paused: set[TP] = set()
        self._draining = False
        self._commit_failures = 0
        #: the slot threads (started by `_spawner`, never by the poll loop) wait on `_wake`
        self._wake = threading.Condition(self._lock)
        self._wake_express = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._closing = False

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        self._open()
        assert self.consumer is not None and self.producer is not None
        self._running = True
        threading.Thread(target=self._spawner, name=f"{self.service}-spawner",
                         daemon=True).start()
        threading.Thread(target=self._express_work, name=f"{self.service}-express",
                         daemon=True).start()
        last_commit = 0.0
        log.info("parallel processor started", topics=self.topics, group=self.group_id,
                 slots=self.slots, prefetch=self.prefetch, transactional=self.transactional)
        try:
            while not self._stopping:
                self._raise_fatal()
                room = self._room()
                self._pause(room <= 0)
                msgs = self._fetch(max(1, min(room, self.settings.batch_size)),
                                   self.poll_timeout_s)
                if msgs:
                    taken = self.stats.taken
                    self._take(msgs)
                    if self.begin is not None:
                        # the rest of a burst, fetched meanwhile: begun before a slot runs
                        self._take_fetched()
                    self._park_while_handling()
                    self._fill()
                    if self.stats.taken > taken and self._idle is not None:
                        self._idle.busy()  # the time spent taking was not idle time
                now = time.monotonic()
                if self._done and now - last_commit >= self.commit_interval_s:
                    self._park_while_handling()
                    self._commit()
                    last_commit = now
            self._drain()
        except Fatal:
            log.exception("fatal error, stopping without checkpoint")
            self._abort()
            raise
        finally:
            self._running = False
            with self._lock:
                self._closing = True
                self._wake.notify_all()
                self._wake_express.notify_all()
            self._close()

    def _park_while_handling(self) -> None:
        """After a take (what the client had fetched is taken and begun, `_take_fetched`) and
        before a commit: park the inputs until the next poll, which probes at once
        (IdleBackoff.park_for_work). Assigned, the client fetched back to back through each
        take, slot wake-up and commit of a burst: about 30,000 fetches per 2,000 tasks
        (docs/benchmarks.md, stop 21). Not while the loop holds partitions paused (full)."""
        if self.park_while_handling and not self._paused and self._idle is not None:
            self._idle.park_for_work()

    def _drain(self) -> None:
        """Stop taking records; give the running ones drain_timeout_s; commit what finished."""
        assert self.consumer is not None
        with self._lock:
            self._draining = True
            dropped = len(self._queue) + len(self._express)
            self._queue.clear()
            self._express.clear()
        deadline = time.monotonic() + self.drain_timeout_s
        self._pause(True)
        while self._active and time.monotonic() < deadline:
            self._raise_fatal()
            self.consumer.consume(1, self.poll_timeout_s)  # keeps the membership alive
            if self._done:
                self._commit()
        self._raise_fatal()
        self._commit()
        if self._active or dropped:
            log.warning("stopped with records unfinished; they will be redelivered",
                        running=self._active, not_started=dropped)

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise Fatal(f"handler stopped the loop: {self._fatal}") from self._fatal

    def _room(self) -> int:
        with self._lock:
            return (self.slots + self.prefetch - self._active - len(self._queue)
                    - len(self._express))

    def _held(self) -> set[TP]:
        return set(self._paused)

    def _pause(self, full: bool) -> None:
        assert self.consumer is not None
        if full:
            if self._idle is not None:
                self._idle.wake()
            new = [tp for tp in self.consumer.assignment()
                   if (tp.topic, tp.partition) not in self._paused]
            if new:
                self.consumer.pause(new)
                self._paused.update((tp.topic, tp.partition) for tp in new)
                self.stats.pauses += 1
        elif self._paused:
            parts = [TopicPartition(t, p) for t, p in self._paused]
            self.consumer.resume(parts)
            self._paused.clear()
            # librdkafka (2.16) fetches a resumed partition only when its broker thread next
            # re-evaluates what is fetchable, up to 1 s later (socket.blocking.max.ms): measured,
            # a 20 ms record took 330 ms per pause. A seek to the position the application is
            # at (nothing is lost: a paused partition's prefetched records were purged, and
            # nothing was consumed since) wakes the fetcher at once.
            try:
                for tp in self.consumer.position(parts):
                    if tp.offset >= 0:
                        self.consumer.seek(tp)
            except KafkaException as exc:  # only latency is at stake
                log.warning("seek after resume failed", error=str(exc))

    def _take(self, msgs: list[Any]) -> None:
        items: list[Item] = []
        records = records_of(msgs)
        if records:
            self.instruments.consumed(records)
        for rec in records:
            tp = (rec.topic, rec.partition)
            with self._lock:
                if rec.offset < self._next.get(tp, -1):
                    continue  # already taken (a fetch raced a pause/resume): never twice
                self._next[tp] = rec.offset + 1
                self._unfinished.setdefault(tp, set()).add(rec.offset)
                items.append(Item(rec, self._epoch.get(tp, 0)))
        if not items:
            return
        express: list[Item] = []
        if self.urgent is not None:
            flags = [self.urgent(it.record) for it in items]
            express = [it for it, f in zip(items, flags, strict=True) if f]
            items = [it for it, f in zip(items, flags, strict=True) if not f]
        with self._lock:
            free = self._active + len(self._queue) < self.slots
            for it in items:
                it.started_at = -1.0 if free else 0.0  # -1: a slot was free when taken
            self._queue.extend(items)
            self._express.extend(express)
            self.stats.taken += len(items) + len(express)
            if express:
                self._wake_express.notify()
        if self.begin is not None:
            self._begin_free()

    def _take_fetched(self) -> None:
        """Take and begin what the client has already fetched (no wait: consume(n, 0)), again
        while records come and slots are free, before the slot threads are woken.

        A burst reaches the loop in pieces: a probe's first fetch answers for one or two
        partitions, the rest is in the client's queue a few ms later, while the loop claims the
        first piece. Woken after the first piece, the slot threads held the GIL while the rest
        sat fetched: measured in the executor process, the rest of a burst of 500 was taken
        0.1-1 s late (docs/executor.md, stop 19). Nothing here waits for a fetch."""
        assert self.consumer is not None
        while True:
            with self._lock:
                free = self.slots - self._active - len(self._queue)
            if free <= 0:
                return
            more = self.consumer.consume(min(free, self.settings.batch_size), 0)
            if self._idle is not None:
                for msg in more:
                    self._idle.saw(msg)
            if not records_of(more):
                return
            self._take(more)

    def _begin_free(self) -> None:
        """Give the waiting records the free slots and begin them all here, before any slot
        thread is woken for them: a burst is begun in this one thread (no GIL hand-off per
        record, no competition from the attempts it starts), then handed to the slots."""
        assert self.begin is not None
        with self._lock:
            batch = []
            while (item := self._next_item()) is not None:
                batch.append(item)
        for item in batch:
            self._begin(item)
        with self._lock:
            self._ready.extend(batch)

    def _begin(self, item: Item) -> None:
        assert self.begin is not None
        item.begun = True
        try:
            item.event = self.begin(item.record)
        except Exception:  # the handler then does the whole work (the hook is an optimisation)
            log.exception("begin hook failed", topic=item.record.topic,
                          offset=item.record.offset)

    def promote(self, key: bytes) -> int:
        """Move the waiting records with this key to the express lane (their owner learnt
        they are answered without long work: the executor, a cancel read after the dispatch
        was taken). Returns how many moved. Safe from any thread."""
        with self._lock:
            moved = [it for it in self._queue if it.record.key == key]
            if not moved:
                return 0
            self._queue = deque(it for it in self._queue if it.record.key != key)
            self._express.extend(moved)
            self._wake_express.notify()
        return len(moved)

    def _express_work(self) -> None:
        """The express lane's thread: handles flagged records outside the slots, in order."""
        while True:
            with self._lock:
                while not self._closing and not self._express:
                    self._wake_express.wait()
                if self._closing:
                    return
                item = self._express.popleft()
            item.started_at = time.monotonic()
            try:
                outputs = self._handle_one(item.record, item.event)
            except BaseException as exc:  # Fatal (the rest is dead-lettered by _handle_one)
                self._fatal = exc
                return
            with self._lock:
                self._done.append(Finished(item, outputs))
                self.stats.finished += 1
                self.stats.express += 1
            self.wake_parked()  # core.loop: the loop commits the outcome now

    def _fill(self) -> None:
        """Wake idle slot threads for the records waiting on free slots (from the poll loop:
        a notify, never a thread start, see `_spawner`)."""
        with self._lock:
            n = len(self._ready) + min(len(self._queue), self.slots - self._active)
            if n > 0:
                self._wake.notify(n)

    def _spawner(self) -> None:
        """Starts the `slots` slot threads, in the background, as soon as the loop runs.

        A thread start waits until the new thread runs (`Thread.start`), which on a busy
        machine takes milliseconds each: done by the poll loop (ThreadPoolExecutor.submit
        starts a thread per submit until max_workers), 2,000 of them took most of the loop's
        time while attempts started, and the commits, hence the cancellations' outcomes, waited
        behind them (measured: a cancelled attempt's outcome committed 22 s after it stopped).
        Idle slot threads wait on a condition (no CPU)."""
        for i in range(self.slots):
            with self._lock:
                if self._closing:
                    return
            t = threading.Thread(target=self._work, name=f"{self.service}-slot_{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _next_item(self) -> Item | None:
        """The next waiting record, if a slot is free. Called with the lock held."""
        if self._draining or not self._queue or self._active >= self.slots:
            return None
        item = self._queue.popleft()
        self._active += 1
        self.stats.peak_running = max(self.stats.peak_running, self._active)
        self.stats.started += 1
        now = time.monotonic()
        if item.started_at < 0:
            self.stats.start_delays.append(now - item.taken_at)
        item.started_at = now
        return item

    def _next_ready(self) -> Item | None:
        """A record the poll loop gave a slot and began, else the next waiting one. Called with
        the lock held. Begun records run even while draining (they hold a slot and a claim)."""
        if self._ready:
            return self._ready.popleft()
        return self._next_item()

    def _work(self) -> None:
        """One slot thread: takes the next waiting record when a slot is free, runs it, and
        takes the next one in the same critical section as it reports the finished one (a
        freed slot is refilled at once, no hand-off)."""
        with self._lock:
            item = self._next_ready()
        while True:
            if item is None:
                with self._lock:
                    while not self._closing and (item := self._next_ready()) is None:
                        self._wake.wait()
                if item is None:
                    return
            try:
                if self.begin is not None and not item.begun:
                    self._begin(item)
                outputs = self._handle_one(item.record, item.event)
            except BaseException as exc:  # Fatal (the rest is dead-lettered by _handle_one)
                self._fatal = exc
                with self._lock:
                    self._active -= 1
                return
            with self._lock:
                self._done.append(Finished(item, outputs))
                self.stats.finished += 1
                self._active -= 1
                item = self._next_ready()
            self.wake_parked()  # core.loop: the loop commits the outcome now

    # -- commits ---------------------------------------------------------------------------
    def _offsets(self) -> list[TopicPartition]:
        """Per owned partition, the lowest unfinished offset (or all taken): what may be
        committed. Called with the lock held."""
        out = []
        for tp, nxt in self._next.items():
            pending = self._unfinished.get(tp)
            low = min(pending) if pending else nxt
            if low != self._committed.get(tp):
                out.append(TopicPartition(tp[0], tp[1], low))
        return out

    def _commit(self) -> None:
        assert self.consumer is not None and self.producer is not None
        with self._lock:
            batch, self._done = self._done, []
            for f in batch:
                rec = f.item.record
                tp = (rec.topic, rec.partition)
                if f.item.epoch == self._epoch.get(tp, 0):
                    self._unfinished.get(tp, set()).discard(rec.offset)
            offsets = self._offsets()
        if not batch and not offsets:
            return
        started = time.perf_counter()
        try:
            if offsets:
                self._assign_for_offsets()
            if self.transactional:
                self._commit_transaction_once(batch, offsets)
            else:
                self._commit_at_least_once(batch, offsets)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            self._commit_failures += 1
            retry = isinstance(err, KafkaError) and (err.txn_requires_abort() or err.retriable())
            if not retry or self._commit_failures >= MAX_COMMIT_TRIES:
                raise Fatal(f"commit failed: {exc}") from exc
            log.warning("commit failed, retrying with the same outputs", error=str(err),
                        tries=self._commit_failures)
            if self.transactional and isinstance(err, KafkaError) and err.txn_requires_abort():
                self._abort()
            if self.before_retry is not None:
                for f in batch:
                    try:
                        f.outputs = self.before_retry(f.outputs)
                    except Exception:  # keep the outputs: a duplicate beats a lost outcome
                        log.exception("before_retry hook failed")
            with self._lock:
                self._done[:0] = batch
            time.sleep(min(2.0, 0.05 * 2 ** self._commit_failures))
            return
        self._commit_failures = 0
        self.instruments.committed(time.perf_counter() - started)
        self._ring()  # core.loop: wakes the parked consumers of the topics just written
        with self._lock:
            for part in offsets:
                key = (part.topic, part.partition)
                if key in self._next:
                    self._committed[key] = part.offset
            self.stats.committed += len(batch)
            self.stats.commits += 1
        self.processed += len(batch)
        if self.on_committed is not None and batch:
            try:
                self.on_committed([f.item.record for f in batch])
            except Exception:  # a hook's failure must not stop the loop (nothing to undo)
                log.exception("on_committed hook failed")

    def _commit_transaction_once(self, batch: list[Finished],
                                 offsets: list[TopicPartition]) -> None:
        assert self.consumer is not None and self.producer is not None
        if self.sink is not None:
            self.sink.flush()
        self._renew_producer()  # core.loop: a producer the broker outage left
        self._begin_transaction()
        for f in batch:
            for out in f.outputs:
                self._produce(out)
        if not self._outputs_delivered():  # core.loop: never commit offsets without outputs
            raise KafkaException(KafkaError(KafkaError._PURGE_QUEUE,
                                            "outputs of the transaction not delivered",
                                            txn_requires_abort=True))
        if offsets:
            with self._guard("send_offsets_to_transaction"):
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), TXN_CALL_TIMEOUT_S)
        with self._guard("commit_transaction"):
            self.producer.commit_transaction(TXN_CALL_TIMEOUT_S)
        self._in_txn = False

    def _commit_at_least_once(self, batch: list[Finished],
                              offsets: list[TopicPartition]) -> None:
        assert self.consumer is not None and self.producer is not None
        for f in batch:
            for out in f.outputs:
                self._produce(out)
        remaining = self.producer.flush(30)
        if remaining or self._delivery_errors:
            raise Fatal(f"outputs not delivered ({remaining} pending, "
                        f"errors {self._delivery_errors[:1]}); not storing offsets")
        if self.sink is not None:
            self.sink.flush()
        if offsets:
            self.consumer.store_offsets(offsets=offsets)

    # -- rebalances ------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        super()._on_assign(consumer, partitions)
        # "parallel processor started" comes before the group join: this line says when the
        # loop can take records (what a test or an operator waits for after a start)
        log.info("partitions assigned", group=self.group_id,
                 partitions=sorted((tp.topic, tp.partition) for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._partitions = self._partitions - {(tp.topic, tp.partition) for tp in partitions}
        # closing (_drain committed what finished): parked partitions stay unassigned and the
        # client unassigns the rest; waking them inside close() can hang it (see core.loop)
        parked = self._running and self._idle is not None and bool(self._idle.parked)
        if self._idle is not None:
            if self._running:
                self._idle.wake()  # parked partitions are unassigned: commits need them
            self._idle.reset()
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        dropped = 0
        try:
            if self._running:
                try:
                    self._commit()
                except Fatal:
                    log.exception("commit on revocation failed; outputs kept for the next one")
            # librdkafka keeps a partition's pause across a rebalance
            # (confluentinc/librdkafka#1849): one paused here and assigned back (our _paused
            # forgets it) would never be fetched again; test_parallel's revocation test lost a
            # record this way. Resume before letting it go.
            still_paused = [TopicPartition(t, p) for t, p in self._paused & revoked]
            if still_paused:
                consumer.resume(still_paused)

            with self._lock:
                for tp in revoked:
                    self._epoch[tp] = self._epoch.get(tp, 0) + 1
                    self._next.pop(tp, None)
                    self._unfinished.pop(tp, None)
                    self._committed.pop(tp, None)
                kept = deque(it for it in self._queue
                             if (it.record.topic, it.record.partition) not in revoked)
                fast = deque(it for it in self._express
                             if (it.record.topic, it.record.partition) not in revoked)
                dropped = len(self._queue) - len(kept) + len(self._express) - len(fast)
                self._queue, self._express = kept, fast
                self.stats.dropped_on_revoke += dropped
                self._paused -= revoked
        finally:
            if parked:
                # wake() assigned inside the callback: answer the revocation whatever raised
                # above (unanswered, librdkafka waits in wait-unassign-call and the group for
                # this member's JoinGroup; core.loop)
                consumer.unassign()
        running = self._active
        if partitions:
            log.info("partitions revoked", partitions=sorted(revoked), not_started_dropped=dropped,
                     running=running)

    def running_count(self) -> int:
        with self._lock:
            return self._active
