"""core.loop.IdleBackoff's parking decision, on a scripted consumer: a loop that was busy
handling what it read is not idle (docs/executor.md, stop 19)."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from fleetplane.core.loop import IdleBackoff

TOPIC = "tasks.dispatch"


class Msg:
    """A consumed message: a record (error None) or an end-of-partition event."""

    def __init__(self, partition: int, offset: int, eof: bool = False) -> None:
        self._p, self._o = partition, offset
        self._err = KafkaError(KafkaError._PARTITION_EOF) if eof else None

    def error(self) -> KafkaError | None:
        return self._err

    def offset(self) -> int:
        return self._o

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._p

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)


class ScriptedConsumer:
    """Returns the queued messages one per poll; records assign/unassign calls."""

    def __init__(self, queue: list[Msg]) -> None:
        self.queue = queue
        self.assigned = [TopicPartition(TOPIC, 0)]
        self.unassigns = 0

    def poll(self, timeout: float = 0.0) -> Any:
        return self.queue.pop(0) if self.queue else None

    def assignment(self) -> list[TopicPartition]:
        return list(self.assigned)

    def unassign(self) -> None:
        self.unassigns += 1
        self.assigned = []

    def assign(self, parts: list[TopicPartition]) -> None:
        self.assigned = list(parts)


def busy_loop(consumer: ScriptedConsumer, idle: IdleBackoff, tell_busy: bool) -> None:
    """A record, then the owner handles it for longer than after_s (a burst's claims), then
    polls: an end-of-partition event comes first, the next records right behind it."""
    assert idle.poll(0.05) is not None  # the record
    time.sleep(idle.after_s * 4)  # handling it
    if tell_busy:
        idle.busy()
    consumer.queue += [Msg(0, 1, eof=True), Msg(0, 1), Msg(0, 2)]
    idle.poll(0.05)  # the end-of-partition event


def test_a_loop_busy_with_its_records_does_not_park_on_the_next_end_of_partition() -> None:
    consumer = ScriptedConsumer([Msg(0, 0)])
    idle = IdleBackoff(consumer, after_s=0.01, probe_s=0.02)  # type: ignore[arg-type]
    busy_loop(consumer, idle, tell_busy=True)
    assert not idle.idle and consumer.unassigns == 0
    # the records behind the event are read, not purged by an unassign
    assert [m.offset() for m in (idle.poll(0.05), idle.poll(0.05))] == [1, 2]


def test_without_busy_the_handling_time_counted_as_idle_and_the_consumer_parked() -> None:
    """What happened before (the reason for busy()): the records fetched behind the event
    were purged by the unassign and had to be fetched again after a probe."""
    consumer = ScriptedConsumer([Msg(0, 0)])
    idle = IdleBackoff(consumer, after_s=0.01, probe_s=0.02)  # type: ignore[arg-type]
    busy_loop(consumer, idle, tell_busy=False)
    assert idle.idle and consumer.unassigns == 1
