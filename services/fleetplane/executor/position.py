"""Where a brand-new executor group starts on tasks.dispatch (docs/executor.md, "A new group").

`auto.offset.reset=earliest` would make a new group (a renamed group id, a fresh deployment on an
old cluster) replay the whole dispatch history, and the attempt leases know only the outcomes of
the last `executor_lease_lookback_s`: older attempts would run again. So before the executor
joins, every partition without a committed offset gets one:

* the committed offset of `executor_previous_group_id`, if set and committed there (a rename
  continues where the old group was);
* otherwise the first dispatch of the last `executor_new_group_lookback_s` (default 10 min, the
  leases' window: a dispatch in it that already ran elsewhere is recognised and not re-run);
  older dispatches that never started are the coordinator's dispatched->started timeout's.

Partitions that already have a committed offset are left alone (a restart continues there)."""

from __future__ import annotations

from fleetplane.core import offsets
from fleetplane.core.settings import Settings
from fleetplane.core.topics import DISPATCH


def position_new_group(settings: Settings, group: str, topic: str = DISPATCH
                       ) -> dict[int, int]:
    """Commit start offsets for the partitions of `topic` (tasks.dispatch) `group` has none
    for (core.offsets.position_new_group with the executor's settings); returns them
    (partition -> offset)."""
    start = offsets.position_new_group(settings, group, [topic],
                                       settings.executor_new_group_lookback_s,
                                       settings.executor_previous_group_id)
    return {p: o for (_, p), o in start.items()}
