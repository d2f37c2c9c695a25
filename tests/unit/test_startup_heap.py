"""core.service.freeze_startup_heap: what exists at start-up is out of the collector's reach."""

from __future__ import annotations

import gc

from fleetplane.core.service import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


def test_objects_of_the_start_up_are_no_longer_scanned_by_collections() -> None:
    """An object graph built before the freeze is in no generation a collection scans (the
    executor's first burst of claims spent 0.47 s of 0.61 s scanning the start-up heap);
    one built after it is."""
    before = [_Node() for _ in range(100)]
    try:
        frozen = freeze_startup_heap()
        after = [_Node() for _ in range(100)]
        scanned = {id(o) for o in gc.get_objects()}
        assert frozen >= len(before)
        assert not any(id(o) in scanned for o in before)
        assert all(id(o) in scanned for o in after)
    finally:
        gc.unfreeze()
