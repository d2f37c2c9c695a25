"""The local stack runs the services no task waits for (accounting, reconciler) at a lower CPU
priority than the dispatch path, every thread of them (docs/operations.md, "CPU priority")."""

from __future__ import annotations

import os
from pathlib import Path

from fleetplane.cli.stack import BACKGROUND_SERVICES, Stack
from fleetplane.core.settings import Settings

#: ClickHouse (chdb, in accounting) raises its memory-accounting thread to -20 itself on
#: purpose; it wakes briefly to read the allocator's statistics
SELF_RAISED = {"MemoryWorker"}


def thread_nice(pid: int) -> dict[str, set[int]]:
    """Thread name -> its threads' nice values (field 19 of /proc/<pid>/task/<tid>/stat)."""
    out: dict[str, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        raw = (task / "stat").read_text()
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        out.setdefault(name, set()).add(int(raw[raw.rindex(")") + 2:].split()[16]))
    return out


def test_accounting_and_reconciler_threads_run_nicer_than_the_dispatch_path(
        stack: Stack) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the children start at the tests' own
    expected = max(base, Settings().background_nice)
    assert expected > 0
    seen: dict[str, set[int]] = {}
    for name, child in stack.children.items():
        if child.proc is not None and child.proc.poll() is None and name != "fake-provider":
            seen[name] = {value for thread, values in thread_nice(child.proc.pid).items()
                          if thread not in SELF_RAISED for value in values}
    assert set(BACKGROUND_SERVICES) <= set(seen)
    for name, values in seen.items():
        if name in BACKGROUND_SERVICES:
            # chdb's and librdkafka's threads too, not only the main thread
            assert values == {expected}, (name, values)
        else:
            assert values == {base}, (name, values)
