"""The repartition step's pure parts: an input record, unchanged, onto the one-partition
scheduler topic (with where it was read), the way back to the original record for a dead letter,
and what a tick says about how far the step had read (docs/coordinator.md)."""

from __future__ import annotations

from fleetplane.coordinator.scheduler import INPUTS_READ_UNTIL
from fleetplane.coordinator.topology import (
    SCHEDULER_TOPIC,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
)
from fleetplane.core import events as ev
from fleetplane.core.errors import NotRetriable
from fleetplane.core.loop import Output, Processor, RawRecord, Record


def repartition(event: ev.Event, rec: Record) -> list[Output]:
    """The repartition step's handler: the record, unchanged, onto the scheduler partition."""
    key = rec.key or b""
    if not isinstance(event, ev.BudgetStatus) and event.task_id.encode() != key:
        raise NotRetriable(f"record key {key!r} is not the task id {event.task_id!r}")
    headers = (*rec.headers.items(), (SOURCE_TOPIC, rec.topic.encode()),
               (SOURCE_PARTITION, str(rec.partition).encode()),
               (SOURCE_OFFSET, str(rec.offset).encode()))
    return [RawRecord(SCHEDULER_TOPIC, rec.key, rec.value, 0, headers)]


def tick_reason(repartitioner: Processor) -> str:
    """A tick says how far the repartition step had read the inputs when it was sent
    (``inputs-read-until-ms=<epoch ms>``): the scheduler declares an attempt lost only over
    time it has seen the inputs of (a backlog after a restart or a broker outage holds the
    heartbeats and outcomes that would have kept it alive). Empty when the step cannot tell."""
    until = repartitioner.inputs_read_until_ms()
    return "" if until is None else f"{INPUTS_READ_UNTIL}{until}"


def source_record(rec: Record) -> Record:
    """The original input record of a scheduler record (before the repartition)."""
    headers = dict(rec.headers)
    topic = headers.pop(SOURCE_TOPIC, None)
    partition = headers.pop(SOURCE_PARTITION, None)
    offset = headers.pop(SOURCE_OFFSET, None)
    return Record(topic=topic.decode() if topic else rec.topic,
                  partition=int(partition) if partition else rec.partition,
                  offset=int(offset) if offset else rec.offset, key=rec.key, value=rec.value,
                  headers=headers, timestamp_ms=rec.timestamp_ms)
