"""The accounting handler: every consumed event becomes ClickHouse rows; nothing is published."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fleetplane.accounting.rowcheck import check
from fleetplane.accounting.rows import rows_for
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.core.events import Event
from fleetplane.core.loop import Handler, Record


def make_handler(sink: ClickHouseSink,
                 observe: Callable[[Event], None] | None = None) -> Handler:
    """A loop handler that buffers the rows of each event in `sink` and returns no events;
    `observe` sees each stored event (the Prometheus fleet metrics)."""

    def handle(event: Event, record: Record) -> Iterable[Event]:
        rows = rows_for(event, record)
        check(rows)  # a value no column can hold: dead-lettered, never a failed batch
        sink.add(rows)
        if observe is not None:
            observe(event)
        return ()

    return handle
