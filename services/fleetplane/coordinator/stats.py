"""The coordinator's counters (in its logs and on GET /coordinator/stats/)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stats:
    """Counters (in logs and on GET /coordinator/stats/)."""

    instance: str = ""
    role: str = "standby"  # standby -> active
    forwarded: int = 0  # input records repartitioned onto the scheduler topic
    replayed: int = 0  # input records read again on assignment (Coordinator._replay_inputs)
    processed: int = 0  # scheduler records decided
    task_events: int = 0  # of which task events (not the clock's ticks)
    decided_s: float = 0.0  # time spent in Scheduler.apply
    published: int = 0  # events decided and published
    dead_letters: int = 0
    forgotten: int = 0  # terminal task rows forgotten past the retention (Scheduler)
    standby_s: float | None = None  # process start -> took the active role
    ready_s: float | None = None  # process start -> table restored, decisions flowing
    recovery_s: float | None = None  # took the active role -> table restored (incl. join)
    restore_s: float | None = None  # reading the changelog alone
    world_load_s: float | None = None  # rebuilding the scheduler's state from the rows
    recovered_rows: int | None = None
    changelog_records: int | None = None
    restores: int = 0
    reseeks: int = 0  # kept for the stats' readers: nothing re-seeks any more
