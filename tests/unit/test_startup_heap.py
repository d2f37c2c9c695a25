"""core.service.freeze_startup_heap: what exists at start-up is out of the collector's reach;
collector_paused: no collection inside a batch step, the collector back on after it."""

from __future__ import annotations

import gc
import weakref

import pytest

from fleetplane.core.service import collector_paused, freeze_startup_heap


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


def test_no_collection_runs_inside_a_paused_block_and_cycles_are_collected_after_it() -> None:
    """Accounting's batch step allocates hundreds of thousands of objects: inside the block
    none of them sets off a collection; a cycle left by the block is collected afterwards."""
    collections: list[str] = []

    def note(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(phase)

    gc.callbacks.append(note)
    try:
        with collector_paused():
            rows = [(i, str(i), {"k": [i]}) for i in range(50_000)]
            cycle = _Node()
            cycle.peer = _Node()
            cycle.peer.peer = cycle
            assert not collections
        del rows
        assert gc.isenabled()
        probe = weakref.ref(cycle)
        del cycle
        assert probe() is not None   # a cycle: reference counting does not free it
        gc.collect()
        assert probe() is None
    finally:
        gc.callbacks.remove(note)


def test_the_collector_is_back_on_when_the_block_raises_and_stays_off_if_it_was() -> None:
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a batch that failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
