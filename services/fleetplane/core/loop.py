"""The one consume-transform-produce loop every confluent-kafka service runs.

A service supplies a pure handler ``(event, record) -> events``; the loop decodes, calls it,
publishes what it returns to each event's topic, and checkpoints:

* at-least-once (``transactional=False``): outputs are produced, ``flush()`` waits for the broker's
  acknowledgement, the sink (if any) flushes, and only then are the input offsets stored
  (``enable.auto.offset.store=False``, as confluent-kafka's consumer.py example does). A
  ``PipelinedSink`` (accounting's) is not waited for at a periodic checkpoint: offsets are
  stored up to each partition's lowest record whose output it has not stored yet.
* exactly-once (``transactional=True``): outputs and input offsets are committed in one Kafka
  transaction (``send_offsets_to_transaction``), as in confluent-kafka's eos_transactions.py.
  An abortable error aborts the transaction and rewinds to the committed offsets.

Errors follow fleetplane.core.errors: Retriable retries with the RetryPolicy, NotRetriable goes to
fleet.dlq with the reason and the original headers, Fatal stops the process without storing the
offset. SIGTERM/SIGINT finish the current batch, checkpoint, and close cleanly.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol, runtime_checkable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from fleetplane.core import doorbell
from fleetplane.core.errors import EXIT_RESTART, Fatal, NotRetriable, Retriable, RetryPolicy
from fleetplane.core.events import DeadLetter, Event
from fleetplane.core.kafka import event_headers
from fleetplane.core.logging import get_logger, task_context
from fleetplane.core.offsets import truncation_guard
from fleetplane.core.serde import Serde, default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import key_for, topic_for
from fleetplane.core.txn_ids import TxnIds, fence_id

#: Timeout of each transactional call (seconds).
TXN_CALL_TIMEOUT_S = 30.0
#: transaction markers in a row an input read uncommitted may show between two records (one
#: per transaction that ended there; a larger gap is records the fetch skipped)
MAX_MARKER_GAP = 32
#: reads of one gap before the loop goes on past it (records deleted by retention stay gone)
MAX_GAP_TRIES = 3

log = get_logger(__name__)


@dataclass(frozen=True)
class Record:
    """Where an input event came from (what a handler may need beyond the event)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int = 0


@dataclass(frozen=True)
class RawRecord:
    """An output a handler publishes as given (bytes, explicit partition and headers), beside
    events: a repartition forwarding input records, or a changelog row of a table
    (core.table), committed in the same transaction as the events and the input offsets."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


Output = Event | RawRecord
Handler = Callable[[Event, Record], Iterable[Output]]
#: on_assign hook: called with the consumer and the partitions assigned, before their records
#: are read (a stateful step restores its table here)
AssignHook = Callable[[Consumer, list[TopicPartition]], None]


class Instruments:
    """What a Processor reports as it runs: metrics and traces (fleetplane.metrics.loop,
    fleetplane.tracing). These defaults do nothing; a service's composition root installs a
    factory with `set_instruments` before it builds its loops (tests that do not leave them
    off)."""

    def consumed(self, records: Sequence[Record]) -> None:
        """A batch of records taken from the consumer."""

    def handle(self, event: Event, rec: Record, run: Callable[[], list[Output]]
               ) -> list[Output]:
        """Runs the handling of one decoded record (`run`) and returns its outputs."""
        return run()

    def error(self, exc: BaseException, action: str) -> None:
        """A record's handling failed: `action` is retry, dead_letter or fatal."""

    def committed(self, seconds: float) -> None:
        """A checkpoint (transaction commit, or flush and offset store) took `seconds`."""

    def aborted(self) -> None:
        """A transaction was aborted."""


NO_INSTRUMENTS = Instruments()
#: (service, group id) -> the instruments of a Processor built afterwards
_instruments: Callable[[str, str], Instruments] | None = None


def set_instruments(factory: Callable[[str, str], Instruments] | None) -> None:
    """Install (or with None remove) the factory every Processor built from now on uses."""
    global _instruments
    _instruments = factory


class Sink(Protocol):
    """A batching side-output (e.g. ClickHouse rows) flushed at every checkpoint."""

    def flush(self) -> None: ...


@runtime_checkable
class PipelinedSink(Sink, Protocol):
    """A sink that stores in the background (accounting's ClickHouse sink). A periodic
    checkpoint calls `hand_off()` instead of `flush()`: it starts storing what the sink holds
    without waiting and returns, per input partition, the lowest offset whose output is not yet
    stored; the checkpoint stores offsets only up to there (Confluent's parallel consumer) and
    keeps the rest for the next one. A revocation and the last checkpoint still flush()."""

    def hand_off(self) -> Mapping[tuple[str, int], int]: ...


def up_to(pending: Mapping[tuple[str, int], int], unfinished: Mapping[tuple[str, int], int]
          ) -> tuple[list[TopicPartition], dict[tuple[str, int], int]]:
    """The offsets to store: each pending one, or the partition's lowest unfinished offset below
    it; and the partitions that stay pending for that reason (with their pending offset)."""
    offsets, kept = [], {}
    for key, offset in pending.items():
        low = unfinished.get(key)
        if low is not None and low < offset:
            kept[key] = offset
            offset = low
        offsets.append(TopicPartition(key[0], key[1], offset))
    return offsets, kept


class Rejected(NotRetriable):
    """NotRetriable with events to publish beside the dead letter (e.g. TaskRejected)."""

    def __init__(self, reason: str, emit: Sequence[Event] = ()) -> None:
        super().__init__(reason)
        self.emit = list(emit)


def headers_dict(raw: Any) -> dict[str, bytes]:
    """Record headers (a list of pairs or a dict, as either Kafka client gives them) as a dict
    of bytes values."""
    if not raw:
        return {}
    pairs: list[tuple[str, Any]] = list(raw.items()) if isinstance(raw, dict) else list(raw)
    return {str(k): v if isinstance(v, bytes) else str(v or "").encode() for k, v in pairs}


def _record(msg: Message) -> Record:
    ts_type, ts = msg.timestamp()
    return Record(
        topic=msg.topic() or "",
        partition=msg.partition() or 0,
        offset=msg.offset() or 0,
        key=msg.key(),
        value=msg.value() or b"",
        headers=headers_dict(msg.headers()),
        timestamp_ms=ts if ts_type else 0,
    )


def records_of(msgs: list[Message]) -> list[Record]:
    """The records of a consumed batch; end-of-partition events and retriable consumer errors
    are skipped (logged), a fatal one raises Fatal."""
    records: list[Record] = []
    for msg in msgs:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                continue
            if err.fatal():
                raise Fatal(f"consumer error: {err}")
            log.warning("consumer error", error=str(err))
            continue
        records.append(_record(msg))
    return records


def dead_letter(service: str, rec: Record, exc: BaseException) -> DeadLetter:
    key = rec.key or b""
    return DeadLetter(
        task_id=key.decode("utf-8", "replace")[:200],
        team=rec.headers.get("team", b"").decode("utf-8", "replace")[:200],
        service=service,
        source_topic=rec.topic,
        source_partition=rec.partition,
        source_offset=rec.offset,
        key=rec.key,
        payload=rec.value,
        headers=rec.headers,
        error_class=type(exc).__name__,
        reason=str(exc)[:2000] or type(exc).__name__,
    )


class IdleBackoff:
    """Stops an idle consumer from re-fetching in a tight loop.

    The embedded broker answers a fetch that finds nothing at once instead of holding it for
    ``fetch.wait.max.ms`` (measured: librdkafka then sends fetches back to back, 0.6-0.8 core per
    idle consumer between the client and the broker; ``fetch.wait.max.ms``,
    ``fetch.min.bytes`` and the fetch backoffs change nothing). Once a consumer has read nothing
    for `after_s`, its partitions are parked: unassigned (no fetches at all); every `probe_s`
    they are assigned again at the position the fetcher had reached, polled until every one
    answered (a record, or end-of-partition: ``enable.partition.eof``) or `probe_window_s`
    passed, and parked again. A record arriving on an idle input therefore waits at most
    `probe_s` plus one fetch round trip; the first record ends the backoff.

    It paces a busy consumer too: a poll waits assigned (the spinning state) at most until
    `after_s` after the last record, so with the default 5 ms a consumer that drained its inputs
    parks between batches and fetches once per `probe_s` instead of back to back; what arrived
    meanwhile comes in one fetch, one batch, one transaction. Measured with `bench.pipeline`
    (1,000 tasks at 20/s, load 20-38): CPU per task 31.6 ms in the services and 7.8 ms in the
    broker, against 48.1 and 23.5 ms with 0.5 s (the librdkafka threads of ingest, router and
    coordinator fell from 24 to 6.5 CPU-s); submit to completed p50 686 instead of 1,892 ms on
    that loaded machine (less CPU contended for). The price is up to `probe_s` per hop on a
    quiet input, which an input idle for 0.5 s paid already.

    Why unassign and not pause: librdkafka (2.16) fetches a resumed partition only about 1 s
    after it was paused, seek or not (measured: 650-1000 ms per resume); an assignment with an
    explicit offset is fetched at once (0-1 ms). A group member stays a member while its
    partitions are parked (``assign()`` outside a rebalance changes only the local fetch set).

    Parked only when every partition's position is known (from a returned record or an
    end-of-partition event) and the owner paused none (`held`). The owner wakes it before
    anything that needs the assignment (storing offsets, a seek) and clears it on a rebalance.
    `after_s <= 0` turns it off (Apache Kafka holds empty fetches itself).

    With a doorbell (`bell`, core.doorbell) a parked consumer waits on it instead of sleeping
    out the probe interval: a loop on this host that committed records to one of its topics
    rings it, and it probes at once (the hand-off no longer waits up to `probe_s`).

    **Only what a ring names** (stop 23). A ring names the partitions its commit wrote; the
    woken consumer assigns those of its parked partitions alone, not every one (the
    coordinator's repartition step has 31: each probe was an assignment, a fetch and 31
    end-of-partition events). A record found there leaves those partitions assigned and the
    rest parked (`active`); the next park joins them again. After the owner's work, the probe
    looks at the partitions that returned records (a drained batch) and those rung meanwhile.
    Every partition is still probed at least every `full_probe_s` while rings come (records
    whose producer does not ring: other hosts, plain clients), and every `probe_s` on an input
    that is not rung at all, as before.

    **A quiet input is probed less and less often** (stop 27, with a doorbell only). Once the
    input has returned no record for `QUIET_AFTER_S`, each probe that no ring started and that
    found nothing doubles the wait before the next, from `probe_s` up to `quiet_probe_s`; a
    record resets it. An idle stack's hops probed every partition every 20 ms (about 0.4 of a
    core for the stack); a ring still wakes them at once, so only records no ring announces
    wait longer, up to `quiet_probe_s` after a quiet spell. Not during a stream (stop 28):
    doubling after any empty probe made a steady stream that no ring announces (a Kafka
    client submitting at 60 tasks/s) wait 20-30 ms longer per hop at p50, the gaps between
    its records being about as long as the probe interval.

    **Not on an input that delivers unannounced records** (stop 32; `unannounced_window_s`,
    ingest's input only by default). A probe that no ring started and that found a record
    says this input has producers that ring nothing (a plain Kafka client writing
    tasks.submitted, another host): for `unannounced_window_s` after such a record the wait
    stays at `probe_s`, so their records are read within a probe after a quiet spell too
    (stop 31 kept ingest's input at `probe_s` for ever instead: 48 ms of CPU a second on an
    idle stack). An input whose records all came announced, or none for the window, backs
    off as above."""

    #: how long an input must have returned no record before its probes back off: longer than
    #: a stream's gaps (>= 10 records a second is a stream), shorter than the coordinator's
    #: clock ticks (every 0.5 s: with 1 s here its idle CPU doubled, 22-26 -> 51-56 ms/s, the
    #: ticks keeping every input "busy"; 0.25 s gave 41, 0.1 s 30)
    QUIET_AFTER_S = 0.1

    def __init__(self, consumer: Consumer, after_s: float, probe_s: float,
                 probe_window_s: float = 0.1, bell: doorbell.Listener | None = None,
                 full_probe_s: float = 0.1, quiet_probe_s: float = 0.0,
                 unannounced_window_s: float = 0.0) -> None:
        self.consumer = consumer
        self.bell = bell
        #: no quiet backoff for this long after a probe no ring started found a record
        self.unannounced_window_s = unannounced_window_s
        #: when a probe no ring started last found a record (monotonic; never: -inf)
        self.unannounced_at = float("-inf")
        #: with a doorbell, the wait between the probes of a quiet input (no ring, nothing
        #: found) doubles from probe_s up to this (stop 27: an idle stack's hops probed every
        #: partition 50 times a second); a record resets it
        self.quiet_probe_s = max(quiet_probe_s, probe_s)
        self.wait_s = probe_s
        self.probed_at = 0.0  # when the last probe began
        #: while rings name partitions, all of them are probed at least this often
        self.full_probe_s = max(full_probe_s, probe_s)
        self.rung = 0  # probes a doorbell started early
        self.after_s = after_s
        self.probe_s = probe_s
        self.probe_window_s = probe_window_s
        self.last_data = time.monotonic()
        #: when the last record was returned (the quiet backoff starts QUIET_AFTER_S later)
        self.last_record = self.last_data
        #: partitions not assigned (parked); the rest of the assignment is `active`
        self.parked: list[TopicPartition] = []
        #: with some partitions parked: those a targeted probe assigned (it found records
        #: there), fetched until the next park; empty when all are assigned or all parked
        self.active: list[TopicPartition] = []
        self.probes = 0
        self.partitions_probed = 0  # partitions assigned by the probes (a ring names a few)
        #: when every parked partition was last probed (the periodic probe: records no ring
        #: announced, e.g. from another host, wait at most full_probe_s)
        self.full_probe_at = time.monotonic()
        #: when the doorbell last rang (an input whose producers do not ring is probed whole
        #: every probe_s)
        self.rung_at = 0.0
        #: where the fetcher is, per partition: after the last record returned, or where an
        #: end-of-partition was reported
        self.positions: dict[tuple[str, int], int] = {}
        #: the timestamp (ms) of the last record returned, per partition
        self.stamps: dict[tuple[str, int], int] = {}
        #: the last park attempt failed: poll with the whole timeout until a record or a park
        self._unparkable = False
        #: parked by `park_for_work`: the next poll probes at once (`_after_work` says what)
        self._probe_next = False
        #: the partitions assigned when the owner parked for work: the probe after the work
        #: looks at them again (records fetched behind the batch were dropped)
        self._worked: set[tuple[str, int]] = set()
        #: the partitions that returned records since the owner last parked for work
        self._returned: set[tuple[str, int]] = set()

    @property
    def enabled(self) -> bool:
        return self.after_s > 0

    @property
    def idle(self) -> bool:
        """Nothing assigned: every partition parked (a loop waiting on its doorbell)."""
        return bool(self.parked) and not self.active

    def partitions(self) -> list[TopicPartition] | None:
        """The whole assignment while some of it is parked (at the parked positions), else
        None (the consumer's assignment is the whole)."""
        return [*self.parked, *self.active] if self.parked else None

    def saw(self, msg: Message) -> None:
        """Note where a returned message leaves its partition (the owner calls it for every
        message it gets from the consumer beside poll(): consume() batches)."""
        err = msg.error()
        offset = msg.offset()
        if offset is None or offset < 0:
            return
        key = (msg.topic() or "", msg.partition() or 0)
        if err is None:
            self.positions[key] = offset + 1
            self.stamps[key] = msg.timestamp()[1]
            self._returned.add(key)
            self.wait_s = self.probe_s
            self.last_record = time.monotonic()
        elif err.code() == KafkaError._PARTITION_EOF:
            self.positions[key] = offset

    def poll(self, timeout_s: float, held: set[tuple[str, int]] | None = None
             ) -> Message | None:
        """consumer.poll(timeout_s) with the backoff: the next message (a record, or an event
        such as end-of-partition or an error), or None."""
        if not self.enabled:
            return self.consumer.poll(timeout_s)
        if not self.idle and self._unparkable and not held \
                and time.monotonic() - self.last_data >= self.after_s:
            # the positions missing at the last attempt may have come since, in a consume()
            # batch (saw): park now rather than after a whole timeout assigned
            self._unparkable = not self._park()
            if self.idle:
                return None
        if not self.idle:
            # waiting assigned is what spins (fetches back to back): wait at most until
            # `after_s` since the last record, then park
            # (the whole timeout when it cannot park: partitions held, or a position unknown)
            left = self.after_s - (time.monotonic() - self.last_data)
            wait = timeout_s if held or self._unparkable else min(timeout_s, max(0.0, left))
            msg = self.consumer.poll(wait)
            if msg is not None:
                self.saw(msg)
            now = time.monotonic()
            if msg is not None and msg.error() is None:
                self.last_data = now
            elif now - self.last_data >= self.after_s and not held:
                self._unparkable = not self._park()
            return msg
        if self._probe_next:  # parked while the owner worked (park_for_work): look now
            self._probe_next = False
            msg = self.consumer.poll(0)
            if msg is not None:
                self.saw(msg)
                return msg
            if not self.idle:
                return None
            msg = self._probe(self._after_work())
            if time.monotonic() - self.rung_at >= self.full_probe_s:
                self._found(msg)  # nothing rang for this input lately
            return msg
        # parked: wait out the probe interval (the consumer still serves its callbacks, e.g. a
        # rebalance, which clears the parking), then fetch once; a doorbell rung by the
        # upstream's commit ends the wait early, and its ring says which partitions to probe
        named: doorbell.Named = None
        rung = False
        if self.bell is not None:
            due = self.probed_at + self.wait_s
            rung = self.bell.wait(min(timeout_s, due - time.monotonic()))
            now = time.monotonic()
            if not rung and now < due:
                return None  # the owner's timeout came first: no probe yet
            if not rung:
                # a due look, whether it probes below or not (an input rung meanwhile has
                # nothing unannounced): the next is wait_s from now (without this, a look that
                # did not probe left `due` in the past and the loop polled back to back until
                # a ring: seen as every hop slower in the open loop)
                self.probed_at = now
            if rung:
                self.rung += 1
                self.rung_at = now
                named = self.bell.take()
            elif now - self.rung_at < self.full_probe_s:
                # quiet for wait_s on an input that rings: nothing new was announced; the
                # periodic probe comes full_probe_s after the last one
                named = set()
            if now - self.full_probe_at >= self.full_probe_s:
                named = None  # the periodic probe: every partition, rung or not
            msg = self.consumer.poll(0)
        else:
            msg = self.consumer.poll(min(timeout_s, self.probe_s))
        if msg is not None:
            self.saw(msg)
            return msg
        if not self.idle:
            return None
        msg = self._probe(named)
        now = time.monotonic()
        if not rung:
            self._found(msg)
        if msg is None and not rung and self.idle \
                and now - self.last_record >= self.QUIET_AFTER_S \
                and now - self.unannounced_at >= self.unannounced_window_s:
            # nothing announced and nothing found for a while, and no unannounced record
            # lately: a quiet input is probed less and less often
            self.wait_s = min(self.wait_s * 2, self.quiet_probe_s)
        return msg

    def _found(self, msg: Message | None) -> None:
        """A probe that no ring started returned `msg`: a record notes the input as one with
        unannounced records (no quiet backoff for unannounced_window_s)."""
        if msg is not None and msg.error() is None:
            self.unannounced_at = time.monotonic()

    def _after_work(self) -> doorbell.Named:
        """What the probe after the owner's work looks at: the partitions it had assigned
        (what was fetched behind its batch was dropped) and those rung meanwhile; every one
        without a doorbell, on an input whose producers do not ring, or when the periodic
        probe is due."""
        worked, self._worked = self._worked, set()
        if self.bell is None:
            return None
        now = time.monotonic()
        if self.bell.drain():
            # rung while the owner worked: the input rings (without this, a hop whose rings
            # all came while it worked counted as not rung and probed every partition after
            # each batch: seen as a test's full probes beside another producer's traffic)
            self.rung_at = now
        named = self.bell.take()
        if now - self.full_probe_at >= self.full_probe_s \
                or now - self.rung_at >= self.full_probe_s:
            return None  # the periodic probe is due, or an input not rung
        return None if named is None else named | worked

    def park_for_work(self, probe_now: bool = True, drained: bool = False) -> bool:
        """The owner has taken what it will handle now and is about to handle it (and
        commit): park until its next poll, which probes at once; whether it parked. Records
        the client fetched behind the batch are dropped with the assignment and read again,
        from the positions, by that probe. `probe_now=False` (a sink in a trickle): the next
        poll waits out the probe interval first, as an idle consumer's does. `drained`: the
        owner's batch took everything the client had fetched, so only the partitions that
        returned records (and those rung meanwhile) are probed after the work; otherwise
        every partition that was assigned.

        Assigned, the client fetches back to back while the owner works, the embedded broker
        answering each empty fetch at once: measured in a 2,000-task burst, 105,000 fetches
        from the coordinator's two consumers in 40 s, up to 10,000 a second, most of its
        librdkafka CPU (docs/benchmarks.md, stop 20). Parked, the batch costs one
        unassignment, one assignment and a fetch per partition probed."""
        if not self.enabled or self.idle:
            return False
        returned, self._returned = self._returned, set()
        worked = {(tp.topic, tp.partition) for tp in self.active} if self.parked else None
        if not self._park():
            return False
        self._probe_next = probe_now
        if drained:
            self._worked = returned
        else:
            self._worked = worked if worked is not None else {
                (tp.topic, tp.partition) for tp in self.parked}
        return True

    def busy(self) -> None:
        """The owner has been handling what it read (not idle): the backoff counts from now.

        Without it, a loop that spent longer than `after_s` on a take (the executor claiming a
        burst) parked at its next poll as soon as that returned an end-of-partition event,
        purging the records fetched right behind it: measured, the rest of a burst of 500 was
        fetched again 0.5 s later (docs/executor.md, stop 19)."""
        self.last_data = time.monotonic()

    def wake(self) -> None:
        """Leave the backoff: the parked partitions are assigned again at their positions
        (with those a targeted probe assigned: the whole assignment)."""
        if self.parked:
            parts, self.parked = [*self.parked, *self.active], []
            self.active = []
            self._assign(parts)
        self._probe_next = False
        self.last_data = time.monotonic()

    def reset(self) -> None:
        """On a rebalance (assignment or revocation): nothing parked, positions unknown."""
        self.parked = []
        self.active = []
        self._probe_next = False
        self.positions.clear()
        self.last_data = time.monotonic()

    def _park(self) -> bool:
        """Park what is assigned; False when it cannot (nothing assigned, a position
        unknown)."""
        try:
            assignment = self.consumer.assignment()
        except KafkaException:
            return False
        if not assignment:
            return False
        parts = []
        for tp in assignment:
            offset = self.positions.get((tp.topic, tp.partition))
            if offset is None:
                return False  # not fetched yet: keep fetching
            parts.append(TopicPartition(tp.topic, tp.partition, offset))
        try:
            self.consumer.unassign()
        except KafkaException as exc:
            log.warning("idle unassign failed", error=str(exc))
            return False
        if self.active:  # a targeted probe's partitions join the rest
            keys = {(tp.topic, tp.partition) for tp in parts}
            self.parked = [*(tp for tp in self.parked if (tp.topic, tp.partition) not in keys),
                           *parts]
            self.active = []
        else:
            self.parked = parts
        return True

    def _assign(self, parts: list[TopicPartition]) -> bool:
        try:
            self.consumer.assign(
                [TopicPartition(tp.topic, tp.partition,
                                self.positions.get((tp.topic, tp.partition), tp.offset))
                 for tp in parts])
            return True
        except KafkaException as exc:
            log.warning("idle re-assign failed", error=str(exc))
            return False

    def _probe(self, named: doorbell.Named = None) -> Message | None:
        """Assign the parked partitions `named` (None: all) and poll until each answered: a
        record ends the backoff on them (the others stay parked), end-of-partition on all
        parks them again."""
        if named is None:
            parts, rest = self.parked, []
            self.full_probe_at = time.monotonic()
        else:
            parts = [tp for tp in self.parked if (tp.topic, tp.partition) in named]
            rest = [tp for tp in self.parked if (tp.topic, tp.partition) not in named]
            if not parts:  # rung for partitions another member holds
                return None
        self.probes += 1
        self.partitions_probed += len(parts)
        self.probed_at = time.monotonic()
        if not self._assign(parts):
            self.last_data = time.monotonic()
            return None
        self.parked, self.active = (rest, parts) if rest else ([], [])
        waiting = {(tp.topic, tp.partition) for tp in parts}
        deadline = time.monotonic() + self.probe_window_s
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            msg = self.consumer.poll(left)
            if msg is None:
                break
            self.saw(msg)
            err = msg.error()
            if err is None or err.code() != KafkaError._PARTITION_EOF:
                # a record (or an error for the owner to see): no longer idle
                self.last_data = time.monotonic()
                return msg
            waiting.discard((msg.topic() or "", msg.partition() or 0))
        if waiting or not self.consumer.assignment():
            # no answer within the window (a slow broker) or a rebalance in between: stay
            # assigned and let the next polls tell
            self.last_data = time.monotonic()
            return None
        self._park()
        return None


class Processor:
    """Runs one handler over input topics until stopped. One instance per OS process/thread."""

    def __init__(
        self,
        service: str,
        topics: Sequence[str],
        handler: Handler,
        settings: Settings,
        *,
        group_id: str | None = None,
        serde: Serde | None = None,
        retry: RetryPolicy | None = None,
        concurrency: int = 1,
        sink: Sink | None = None,
        commit_interval_s: float = 0.05,
        commit_when_drained: bool = True,
        transactional: bool | None = None,
        instance_id: str | None = None,
        group_instance_id: str | None = None,
        on_assign: AssignHook | None = None,
        on_abort: Callable[[], None] | None = None,
        on_ready: Callable[[], None] | None = None,
        before_commit: Callable[[], Iterable[Output]] | None = None,
        isolation: str | None = None,
        quiet_probe_s: float | None = None,
        unannounced_window_s: float | None = None,
    ) -> None:
        self.service = service
        self.topics = list(topics)
        self.handler = handler
        self.settings = settings
        self.serde = serde or default_serde()
        self.retry = retry or RetryPolicy()
        self.sink = sink
        self.commit_interval_s = commit_interval_s
        # a hop forwards at once when its input is drained (the next service waits on this
        # commit); a sink at the end of the pipeline (accounting) prefers larger batches
        self.commit_when_drained = commit_when_drained
        #: park the inputs while a drained batch is handled (IdleBackoff.park_for_work)
        self.park_while_handling = settings.idle_park_while_handling
        self.transactional = settings.transactional if transactional is None else transactional
        self.group_id = group_id or f"fleetplane-{service}"
        self.instance_id = instance_id or f"{self.group_id}-{settings.instance_id}"
        # static member id (default: instance_id); a role shared by replicas may differ from
        # the transactional.id (coordinator: one role, one fresh transactional.id per holder)
        self.group_instance_id = group_instance_id or self.instance_id
        self.on_assign = on_assign  # before the assigned partitions' records are read
        self.on_abort = on_abort  # after an aborted transaction, before the rewind
        # after the producer is initialised (its transactional id registered and fenceable),
        # before the consumer joins the group (the coordinator's takeover claim)
        self.on_ready = on_ready
        # outputs that summarise the whole batch (one record per key per checkpoint, e.g. the
        # router's statistics): produced at each checkpoint, in its transaction, before the
        # input offsets are committed
        self.before_commit = before_commit
        #: the consumer's isolation.level (None: the settings', read_committed); only for an
        #: input whose transactional records are copies of committed events (coordinator app)
        self.isolation = isolation
        #: the longest wait between probes of a quiet input (IdleBackoff; None: the settings'
        #: idle_quiet_probe_s): ingest's input is written by producers that ring no doorbell
        self.quiet_probe_s = settings.idle_quiet_probe_s if quiet_probe_s is None \
            else quiet_probe_s
        #: no quiet backoff this long after an unannounced record (IdleBackoff; None: the
        #: settings' idle_unannounced_window_s): ingest's input, written by clients that ring
        #: no doorbell
        self.unannounced_window_s = (settings.idle_unannounced_window_s
                                     if unannounced_window_s is None else unannounced_window_s)
        #: read uncommitted, an input's offsets have no gaps but transaction markers: the next
        #: offset expected per partition, to catch records a fetch skipped (`_skipped`)
        self._next: dict[tuple[str, int], int] = {}
        self._gap_tries: dict[tuple[tuple[str, int], int], int] = {}
        self._pool = ThreadPoolExecutor(concurrency) if concurrency > 1 else None
        self._running = False
        self._stopping = False
        self._pending: dict[tuple[str, int], int] = {}
        self._delivery_errors: list[KafkaError] = []
        self._in_txn = False
        self._outage = False  # the broker went away (see _on_producer_error)
        self._retired = False  # the producer aborted a transaction: replace it (_renew_producer)
        self._txn_ids = TxnIds(settings)
        self._tx_id: str | None = None
        self.processed = 0
        self.exit_on_hang = False
        # past its own timeout plus a margin for a loaded machine, the call will not return:
        # every service stalled for 90 s (3 x the timeout) after a chaos run's broker restart
        self.hang_limit_s = TXN_CALL_TIMEOUT_S + 15.0
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self._idle: IdleBackoff | None = None
        self._bell: doorbell.Listener | None = None
        #: topics this checkpoint's outputs went to: their parked consumers are rung after it
        self._produced: set[str] = set()
        #: topic -> partitions the open transaction's records were delivered to (the ring)
        self._written: dict[str, set[int]] = {}
        self._read_until_ms = 0  # see inputs_read_until_ms
        self._partitions: frozenset[tuple[str, int]] = frozenset()
        self._read_until_noted = 0.0
        self._read_to_end_at: dict[tuple[str, int], int] = {}  # epoch ms, per partition
        self.instruments = (NO_INSTRUMENTS if _instruments is None
                            else _instruments(service, self.group_id))

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self._stopping = True
        bell = self._bell
        if bell is not None:
            bell.wake()  # a parked loop stops now, not after the probe interval

    def wake_parked(self) -> None:
        """From another thread: a loop parked by the idle backoff returns from its wait now
        (e.g. work finished elsewhere is to be committed; nothing happens without a doorbell)."""
        bell, idle = self._bell, self._idle
        if bell is not None and idle is not None and idle.idle:
            bell.wake()

    def inputs_read_until_ms(self) -> int | None:
        """How far this loop has read its inputs, as a time (epoch ms): when it last saw every
        assigned partition read to its end as of the last fetch (now, for a loop that keeps
        up), else the timestamp of the last record read from the partition furthest behind;
        0 when the loop is not running, has no partition assigned, or a partition's position is
        not known yet. None when
        the loop cannot tell (the idle backoff, which tracks positions, is off). Safe to call
        from another thread: the loop's own thread takes the figure (`_note_read_until`,
        every 100 ms; calling the consumer from a second thread stalled the loop), so a loop
        stuck in a handler reports the time it got stuck.

        The coordinator's clock stamps its ticks with it, so that an executor's silence is
        judged only over inputs the scheduler has seen (docs/coordinator.md, "Timeouts")."""
        idle = self._idle
        if idle is not None and not idle.enabled:
            return None
        if self.consumer is None or idle is None or not self._running:
            return 0
        return self._read_until_ms

    def _note_read_until(self) -> None:
        """The loop's thread: how far the inputs are read (see inputs_read_until_ms).

        A partition is read to its end when the position has reached the high watermark. With
        read_committed, the fetcher stops (and reports end-of-partition) at the last stable
        offset instead: behind an open transaction, e.g. one a killed producer left behind until
        its restart aborts it, committed records after it are not returned yet. Such a partition
        is behind: it counts from the later of its last record's timestamp and the last time it
        was seen at its high watermark, not from now (the idle backoff parks it all the same,
        so being parked does not mean being read to the end)."""
        consumer, idle = self.consumer, self._idle
        now_s = time.monotonic()
        if consumer is None or idle is None or not idle.enabled \
                or now_s - self._read_until_noted < 0.1:
            return
        self._read_until_noted = now_s
        now = int(time.time() * 1000)
        until = now
        try:
            parts = idle.partitions() or consumer.assignment()
            if not parts:
                until = 0  # nothing assigned yet (or between assignments): cannot tell
            for tp in parts:
                key = (tp.topic, tp.partition)
                position = idle.positions.get(key)
                if position is None:
                    until = 0
                    break
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                if 0 <= high <= position:
                    self._read_to_end_at[key] = now
                else:
                    until = min(until, max(idle.stamps.get(key, 0),
                                           self._read_to_end_at.get(key, 0)))
        except (KafkaException, RuntimeError):
            until = 0
        self._read_until_ms = until

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the loop after its batch; and, since the loop is then the
        process's own, a transactional call that hangs ends the process (see _guard)."""
        self.exit_on_hang = True

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal received, stopping", signal=signum)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _open(self) -> None:
        self.producer = self._new_producer()
        cfg = self.settings.consumer_config(self.group_id)
        # Static membership: a replica restarted after a crash (SIGKILL) takes its partitions back
        # at once instead of waiting for the broker to expire the dead member (the embedded broker
        # never does; see docs/operations.md).
        cfg.setdefault("group.instance.id", self.group_instance_id)
        if self.isolation is not None:
            cfg["isolation.level"] = self.isolation
        # transactional: offsets go in the transaction; at-least-once: the client commits the
        # offsets stored after each checkpoint (settings.consumer_config follows the global
        # FLEETPLANE_TRANSACTIONAL, not this loop's: accounting, always at-least-once, never
        # committed an offset while it was true, and re-read every topic after each restart)
        cfg["enable.auto.commit"] = not self.transactional
        if self.settings.idle_backoff_s > 0:
            cfg.setdefault("enable.partition.eof", True)  # ends an idle probe (IdleBackoff)
        self.consumer = Consumer(cfg)
        # a hop that forwards as soon as its input is drained listens; a sink that prefers
        # larger batches (accounting) keeps probing at the interval
        if self.settings.handoff_doorbell and self.settings.idle_backoff_s > 0 \
                and self.commit_when_drained:
            self._bell = doorbell.listener(self.settings.kafka_bootstrap, self.topics)
        self._idle = IdleBackoff(self.consumer, self.settings.idle_backoff_s,
                                 self.settings.idle_probe_s, bell=self._bell,
                                 full_probe_s=self.settings.idle_full_probe_s,
                                 quiet_probe_s=self.quiet_probe_s,
                                 unannounced_window_s=self.unannounced_window_s)
        if self.transactional:
            self.producer.init_transactions(TXN_CALL_TIMEOUT_S)
        if self.on_ready is not None:
            self.on_ready()
        self.consumer.subscribe(self.topics, on_assign=truncation_guard(self._on_assign),
                                on_revoke=self._on_revoke)

    def _new_producer(self) -> Producer:
        """A producer; a transactional one under a new generation of the instance's
        transactional id (core.txn_ids: a producer id that never had an aborted transaction;
        the first one of the process fences what its predecessor left open)."""
        self._tx_id = self._txn_ids.next_id(self.instance_id) if self.transactional else None
        return Producer({**self.settings.producer_config(self._tx_id),
                         "error_cb": self._on_producer_error})

    def _on_producer_error(self, err: KafkaError) -> None:
        """The producer's error callback (served by producer.poll, on the loop's thread).

        A transaction must not span a broker outage. Measured on the embedded broker: a
        transaction that gets records both before and after a broker restart leaves its
        partitions' last stable offset stuck for good (commit_transaction succeeds, yet no
        read_committed consumer ever reads past it, nor the records other producers commit
        after it, until the broker restarts again); aborting it with nothing produced after the
        restart leaves the log clean. So when every broker connection is lost, what the
        producer still holds for the open transaction is purged, and before anything more is
        produced in it a new producer with the same transactional.id fences it (the broker
        aborts it) and its inputs are read again (_abort_after_outage)."""
        if err.code() != KafkaError._ALL_BROKERS_DOWN or not self.transactional:
            return
        self._outage = True
        if self._in_txn and self.producer is not None:
            try:
                self.producer.purge(in_queue=True, in_flight=True, blocking=False)
            except KafkaException:
                log.warning("purge after the broker went away failed", exc_info=True)

    def _renew_producer(self) -> bool:
        """Before a transaction begins: a new producer, under a new transactional id, if the
        broker went away (see _on_producer_error) or the last transaction was aborted; whether
        there was one.

        After an outage the old producer's open transaction is aborted by fencing its id (its
        view of the transaction coordinator is also what librdkafka#5456 hangs on: its
        send_offsets_to_transaction blocked past every timeout after a broker restart). After
        an abort its producer id must not write again: the embedded broker would have every
        later record of that id on the aborted transaction's partitions skipped by consumers
        (core.txn_ids)."""
        if self.producer is not None:
            self.producer.poll(0)  # serves the error callback
        if not (self.transactional and (self._outage or self._retired)):
            return False
        outage, self._outage, self._retired = self._outage, False, False
        old, old_id, self.producer = self.producer, self._tx_id, None
        if old is not None:
            with suppress(KafkaException):
                old.purge(in_queue=True, in_flight=True, blocking=False)
        if outage and old_id is not None:
            with self._guard("init_transactions"):
                fence_id(self.settings, old_id)
        self.producer = self._new_producer()
        with self._guard("init_transactions"):
            self.producer.init_transactions(TXN_CALL_TIMEOUT_S)
        if outage:
            log.warning("the broker went away: the old producer's transaction is fenced, a "
                        "new producer takes over", transactional_id=self._tx_id)
        return True

    def _abort_after_outage(self) -> bool:
        """If the broker went away during the open transaction: a new producer fences it (the
        broker aborts it; measured, abort_transaction after the restart still left the last
        stable offset stuck) and its inputs are read again; whether it did."""
        if not (self.transactional and self._in_txn):
            return False
        if self.producer is not None:
            self.producer.poll(0)  # serves the error callback
        if not self._outage:
            return False
        self._renew_producer()
        log.warning("its open transaction is dropped; its inputs are read again")
        self.instruments.aborted()
        self._in_txn = False
        self._pending.clear()
        self._produced = set()
        self._written = {}
        if self.on_abort is not None:
            self.on_abort()
        self._rewind()
        return True

    def run(self) -> None:
        self._open()
        assert self.consumer is not None and self.producer is not None
        self._running = True
        last_checkpoint = time.monotonic()
        log.info("processor started", topics=self.topics, group=self.group_id,
                 transactional=self.transactional)
        try:
            while not self._stopping:
                msgs = self._fetch()
                if self.transactional and self._in_txn:
                    self.producer.poll(0)  # an outage purges the open transaction at once
                self._note_read_until()
                if msgs:
                    if self.park_while_handling and (
                            self.commit_when_drained or len(msgs) < self.settings.batch_size):
                        # no fetching while the batch is handled and committed
                        # (IdleBackoff.park_for_work); a hop parks with a full batch too (what
                        # the client fetched behind it is read again by the next poll's probe),
                        # a sink that prefers large batches only once its input is drained
                        assert self._idle is not None
                        self._idle.park_for_work(self._probe_at_once(msgs),
                                                 drained=len(msgs) < self.settings.batch_size)
                    self._process(msgs)
                now = time.monotonic()
                drained = self._drained(msgs)
                if self._pending and (drained or now - last_checkpoint >= self.commit_interval_s):
                    self._checkpoint(drain=False)
                    last_checkpoint = now
                elif not self._pending:
                    last_checkpoint = now
            self._checkpoint()
        except Fatal:
            log.exception("fatal error, stopping without checkpoint")
            self._abort()
            raise
        finally:
            self._running = False
            self._close()

    def _probe_at_once(self, msgs: list[Message]) -> bool:
        """After this batch, look for more at once (True), or only after the probe interval
        (a sink in a trickle, accounting.batchloop)."""
        return True

    def _drained(self, msgs: list[Message]) -> bool:
        """After a batch is handled (or a poll found nothing): checkpoint now rather than at
        the commit interval, because the inputs are drained (commit_when_drained: the next
        service waits on this commit)."""
        return self.commit_when_drained and len(msgs) < self.settings.batch_size

    def _fetch(self, limit: int | None = None, timeout_s: float | None = None
               ) -> list[Message]:
        """The next batch: waits (up to `timeout_s`, default poll_timeout_s) for the first
        record only, then takes what is already fetched, up to `limit` (default batch_size).
        (librdkafka's consume(n, timeout) waits the whole timeout unless n records arrive:
        every hop added up to poll_timeout_s to a task's latency. With the batch drained, the
        loop checkpoints at once: the outputs are visible downstream without waiting for a
        commit interval.)"""
        assert self.consumer is not None and self._idle is not None
        limit = self.settings.batch_size if limit is None else limit
        first = self._idle.poll(self.settings.poll_timeout_s if timeout_s is None
                                else timeout_s, self._held())
        if first is None:
            return []
        if limit <= 1:
            return [first]
        rest = self.consumer.consume(limit - 1, 0)
        if self._idle is not None:
            for msg in rest:
                self._idle.saw(msg)
        return [first, *rest]

    def _held(self) -> set[tuple[str, int]]:
        """Partitions the loop paused itself (left alone by the idle backoff)."""
        return set()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.consumer is not None:
            try:
                self.consumer.close()
            except KafkaException:
                log.warning("consumer close failed", exc_info=True)
        if self.producer is not None:
            self.producer.flush(5)
            self.producer = None  # releases librdkafka's threads and connections
        self.consumer = None
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        idle = self._idle
        log.info("processor stopped", processed=self.processed,
                 probes=idle.probes if idle else 0, rung=idle.rung if idle else 0,
                 partitions_probed=idle.partitions_probed if idle else 0)

    # -- processing ------------------------------------------------------------------------
    def _process(self, msgs: list[Message]) -> None:
        assert self.producer is not None
        records = records_of(msgs)
        if not records or self._skipped(records):
            return
        self.instruments.consumed(records)
        if self.transactional and not self._in_txn:
            self._renew_producer()
            self._begin_transaction()
        if self._pool is not None:
            results: Iterable[list[Output]] = self._pool.map(self._handle_one, records)
        else:
            results = map(self._handle_one, records)
        results = list(results)
        if self._abort_after_outage():
            return  # the batch is read again from the committed offsets
        for rec, outputs in zip(records, results, strict=True):
            for out in outputs:
                self._produce(out)
            self._pending[(rec.topic, rec.partition)] = rec.offset + 1
            if self.isolation == "read_uncommitted":
                self._next[(rec.topic, rec.partition)] = rec.offset + 1
            self.processed += 1
        self.producer.poll(0)

    def _skipped(self, records: list[Record]) -> bool:
        """Whether the batch starts past records of its partitions never read (an input read
        uncommitted has no gaps but transaction markers, at most MAX_MARKER_GAP in a row); if
        so, they are read again from the first one missing and the batch is not processed.
        Quiet chaos run Q3 of stop 18: the coordinator's schedule step, after a takeover and a
        broker restart, never applied 405 forwarded records (60 completions) and went on from
        the next ones; the cause was not found."""
        if self.isolation != "read_uncommitted" or not self._next:
            return False
        first: dict[tuple[str, int], int] = {}
        last: dict[tuple[str, int], int] = {}
        gaps: dict[tuple[str, int], int] = {}  # partition -> where to read again
        for rec in records:
            tp = (rec.topic, rec.partition)
            expected = last[tp] + 1 if tp in last else self._next.get(tp)
            if expected is not None and rec.offset > expected + MAX_MARKER_GAP \
                    and tp not in gaps:
                # before the batch: from the first record missing; inside it: from the
                # batch's first record of the partition (the batch is not processed)
                gaps[tp] = expected if tp not in last else first[tp]
            first.setdefault(tp, rec.offset)
            last[tp] = rec.offset
        for tp, again in list(gaps.items()):
            tries = self._gap_tries.get((tp, again), 0) + 1
            self._gap_tries[(tp, again)] = tries
            if tries > MAX_GAP_TRIES:  # the records are gone (retention): the gap stands
                log.error("records of the input are gone: going on past them", topic=tp[0],
                          partition=tp[1], missing_from=again)
                del gaps[tp]
        if not gaps:
            return False
        assert self.consumer is not None
        for (topic, partition), again in gaps.items():
            log.error("records of the input were skipped: reading them again", topic=topic,
                      partition=partition, read_again_from=again)
        if self._idle is not None:
            self._idle.wake()  # parked partitions are unassigned: a seek needs them
        for (topic, partition), offset in first.items():
            self.consumer.seek(TopicPartition(topic, partition,
                                              gaps.get((topic, partition), offset)))
        self.instruments.error(RuntimeError("input records skipped"), "skipped")
        return True

    def _handle_one(self, rec: Record, event: Event | None = None) -> list[Output]:
        """Handle one record; `event`: the record already decoded (ParallelProcessor's begin
        hook decoded it), else it is decoded here."""
        try:
            if event is None:
                event = self.serde.decode(rec.value)
        except NotRetriable as exc:
            log.warning("undecodable record to DLQ", topic=rec.topic, offset=rec.offset,
                        reason=str(exc))
            self.instruments.error(exc, "dead_letter")
            return [dead_letter(self.service, rec, exc)]
        with task_context(event.task_id, event_type=type(event).__name__):
            return self.instruments.handle(event, rec, lambda: self._handle_event(event, rec))

    def _handle_event(self, event: Event, rec: Record) -> list[Output]:
        attempt = 1
        while True:
            try:
                return list(self.handler(event, rec))
            except Fatal as exc:
                self.instruments.error(exc, "fatal")
                raise
            except Rejected as exc:
                log.warning("record rejected to DLQ", reason=str(exc))
                self.instruments.error(exc, "dead_letter")
                return [*exc.emit, dead_letter(self.service, rec, exc)]
            except Retriable as exc:
                if attempt >= self.retry.maximum_attempts:
                    log.error("retries exhausted, record to DLQ", reason=str(exc))
                    self.instruments.error(exc, "dead_letter")
                    return [dead_letter(self.service, rec, exc)]
                delay = self.retry.delay(attempt)
                log.warning("retriable error", attempt=attempt, delay_s=delay,
                            reason=str(exc))
                self.instruments.error(exc, "retry")
                time.sleep(delay)
                attempt += 1
            except KafkaException as exc:
                # the Kafka client failed inside the handler (a dead producer): the input is
                # fine and must not be dead-lettered; the process stops without committing it,
                # restarts (supervisor, orchestrator) and reads it again
                self.instruments.error(exc, "fatal")
                raise Fatal(f"Kafka client error in the handler: {exc}") from exc
            except Exception as exc:  # NotRetriable and anything unexpected
                log.exception("handler failed, record to DLQ")
                self.instruments.error(exc, "dead_letter")
                return [dead_letter(self.service, rec, exc)]

    def _produce(self, event: Output) -> None:
        assert self.producer is not None
        if isinstance(event, RawRecord):
            self._produce_raw(event)
            return
        value = self.serde.encode(event)
        topic = topic_for(event)
        self._produced.add(topic)
        while True:
            try:
                self.producer.produce(topic, key=key_for(event), value=value,
                                      headers=event_headers(event),
                                      on_delivery=self._on_delivery)
                return
            except BufferError:
                self.producer.poll(0.1)

    def _produce_raw(self, raw: RawRecord) -> None:
        assert self.producer is not None
        kwargs: dict[str, Any] = {} if raw.partition is None else {"partition": raw.partition}
        self._produced.add(raw.topic)
        while True:
            try:
                self.producer.produce(raw.topic, key=raw.key, value=raw.value,
                                      headers=list(raw.headers), on_delivery=self._on_delivery,
                                      **kwargs)
                return
            except BufferError:
                self.producer.poll(0.1)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(err)
            return
        partition = msg.partition()
        if partition is not None:  # where the doorbell's ring says the records are
            topic = msg.topic() or ""
            parts = self._written.get(topic)
            if parts is None:
                self._written[topic] = {partition}
            else:
                parts.add(partition)

    # -- checkpoints -----------------------------------------------------------------------
    @property
    def partitions(self) -> frozenset[tuple[str, int]]:
        """The (topic, partition) pairs the group gave this loop, parked by the idle backoff or
        not (consumer.assignment() leaves parked ones out). Safe to read from any thread."""
        return self._partitions

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._partitions = self._partitions | {(tp.topic, tp.partition) for tp in partitions}
        for tp in partitions:
            self._next.pop((tp.topic, tp.partition), None)
        if self._idle is not None:
            self._idle.reset()
        if self.on_assign is not None:
            self.on_assign(consumer, partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._partitions = self._partitions - {(tp.topic, tp.partition) for tp in partitions}
        if self.consumer is None or not self._running:
            # closing (the final checkpoint is done): leave the unassignment to the client.
            # Waking parked partitions here and unassigning them again inside close() hung
            # close() for good (seen in the coordinator's SIGTERM test).
            if self._idle is not None:
                self._idle.reset()
            return
        # (anything parked: wake() below assigns inside the callback)
        parked = self._idle is not None and bool(self._idle.parked)
        if self._idle is not None:
            self._idle.wake()  # parked partitions are unassigned: storing offsets needs them
            self._idle.reset()
        try:
            if self._running and self._pending:
                self._checkpoint()
        finally:
            if parked:
                # wake() assigned inside the callback: the client then leaves the unassignment
                # that follows a revocation to us, even when the checkpoint raised (an
                # unanswered revocation keeps the member from rejoining: librdkafka waits in
                # wait-unassign-call and the group waits for the member's JoinGroup)
                consumer.unassign()

    def _checkpoint(self, *, drain: bool = True) -> None:
        """Store the handled records' offsets (after their outputs are delivered and the sink's
        rows stored). Not `drain`: a PipelinedSink is not waited for; offsets are stored up to
        its lowest unstored record, and the rest stay pending for the next checkpoint."""
        if not self._pending:
            return
        assert self.consumer is not None and self.producer is not None
        if self._abort_after_outage():
            return
        if self.before_commit is not None:
            for out in self.before_commit():
                self._produce(out)
        self._assign_for_offsets()
        started = time.perf_counter()
        kept: dict[tuple[str, int], int] = {}
        if self.transactional:
            self._commit_transaction([TopicPartition(t, p, o)
                                      for (t, p), o in self._pending.items()])
        else:
            remaining = self.producer.flush(30)
            if remaining or self._delivery_errors:
                raise Fatal(f"outputs not delivered ({remaining} pending, "
                            f"errors {self._delivery_errors[:1]}); not storing offsets")
            unfinished: Mapping[tuple[str, int], int] = {}
            if not drain and isinstance(self.sink, PipelinedSink):
                unfinished = self.sink.hand_off()
            elif self.sink is not None:
                self.sink.flush()
            offsets, kept = up_to(self._pending, unfinished)
            self.consumer.store_offsets(offsets=offsets)
        self.instruments.committed(time.perf_counter() - started)
        self._pending.clear()
        self._pending.update(kept)
        self._ring()

    def _ring(self) -> None:
        """After a commit: wake the parked consumers of the topics it wrote (core.doorbell)."""
        if self._produced:
            if self.settings.handoff_doorbell:
                written = self._written
                doorbell.ring(self.settings.kafka_bootstrap,
                              {topic: written.get(topic) or () for topic in self._produced})
            self._produced = set()
        self._written = {}

    def _begin_transaction(self) -> None:
        assert self.producer is not None
        self._delivery_errors.clear()
        self.producer.begin_transaction()
        self._in_txn = True

    def _assign_for_offsets(self) -> None:
        """Before a commit: wake parked inputs where storing the offsets needs them assigned
        (at-least-once). A transaction's offsets do not (`send_offsets_to_transaction`): with
        `park_while_handling` a parked input stays parked until the next poll probes it
        (measured: 20 assignments a second in a burst, each fetching back to back until the
        next park; docs/benchmarks.md, stop 20)."""
        if self._idle is not None and not (self.transactional and self.park_while_handling):
            self._idle.wake()

    def _outputs_delivered(self) -> bool:
        """Before a commit: every output of the open transaction acknowledged. A broker outage
        purges what the producer holds (_on_producer_error), and a commit after a purge would
        commit the input offsets without the outputs (the chaos run: a coordinator's scheduler
        step committed its offsets past a completion and wrote none of its decisions)."""
        assert self.producer is not None
        with self._guard("flush"):
            remaining = self.producer.flush(TXN_CALL_TIMEOUT_S)
        if remaining or self._delivery_errors or self._outage:
            log.warning("outputs of the transaction not delivered: aborting it",
                        remaining=remaining, outage=self._outage,
                        errors=[str(e) for e in self._delivery_errors[:3]])
            return False
        return True

    def _commit_transaction(self, offsets: list[TopicPartition], tries: int = 1) -> None:
        assert self.consumer is not None and self.producer is not None
        if not self._outputs_delivered():
            self._abort()
            if self.on_abort is not None:
                self.on_abort()
            self._rewind()
            return
        try:
            if self.sink is not None:
                self.sink.flush()
            with self._guard("send_offsets_to_transaction"):
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), TXN_CALL_TIMEOUT_S)
            with self._guard("commit_transaction"):
                self.producer.commit_transaction(TXN_CALL_TIMEOUT_S)
            self._in_txn = False
        except KafkaException as exc:
            err = exc.args[0]
            if isinstance(err, KafkaError) and err.txn_requires_abort():
                log.warning("transaction aborted, rewinding", error=str(err))
                self._abort()
                if self.on_abort is not None:
                    self.on_abort()
                self._rewind()
                return
            if isinstance(err, KafkaError) and err.retriable() and tries < 10:
                log.warning("commit retriable error, retrying", error=str(err), tries=tries)
                time.sleep(min(5.0, 0.2 * 2 ** tries))
                self._commit_transaction(offsets, tries + 1)
                return
            raise Fatal(f"transaction commit failed: {exc}") from exc

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """librdkafka's send_offsets_to_transaction can block past its timeout when the group
        coordinator goes away mid-transaction (confluentinc/librdkafka#5456; the chaos run's
        broker restart hit it: the router stopped routing for good). A call still blocked after
        hang_limit_s ends a service process (exit 75): the supervisor restarts it, and the new
        instance's init_transactions fences and aborts the open transaction, so its inputs are
        processed again (at-least-once across the restart, exactly-once in the output topics).
        In-process (tests) it is only logged."""
        def hung() -> None:
            log.critical("transactional call hung", call=what, limit_s=self.hang_limit_s,
                         action="exit 75" if self.exit_on_hang else "none (in-process)")
            if self.exit_on_hang:
                os._exit(EXIT_RESTART)

        timer = threading.Timer(self.hang_limit_s, hung)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _abort(self) -> None:
        if self.transactional and self._in_txn and self.producer is not None:
            self.instruments.aborted()
            if not self._outage:  # after an outage the renewal fences the id instead
                try:
                    with self._guard("abort_transaction"):
                        self.producer.abort_transaction(TXN_CALL_TIMEOUT_S)
                except KafkaException:
                    log.warning("abort failed", exc_info=True)
                    self._outage = True  # the renewal fences the id: the broker aborts it
            self._in_txn = False
            self._retired = True  # its producer id does not write again (core.txn_ids)
        self._pending.clear()
        self._produced = set()
        self._written = {}

    def _rewind(self) -> None:
        assert self.consumer is not None
        self._next.clear()  # known again from the records read after the seek
        if self._idle is not None:
            self._idle.wake()
            self._idle.reset()  # the positions move back to the committed offsets
        assignment = self.consumer.assignment()
        if not assignment:
            return
        for tp in self.consumer.committed(assignment, timeout=30):
            offset = tp.offset if tp.offset >= 0 else -2  # OFFSET_BEGINNING
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
