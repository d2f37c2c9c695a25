"""StallWatchdog (coordinator.workarounds) on a fake Faust app: when it re-seeks, when not."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from types import SimpleNamespace
from typing import Any

import pytest

from fleetplane.coordinator import workarounds
from fleetplane.coordinator.workarounds import StallWatchdog

TP = namedtuple("TP", "topic partition")
ROUTED0 = TP("tasks.routed", 0)
CHANGELOG0 = TP("fleetplane-coordinator-tasks-changelog", 0)


class FakeConsumer:
    def __init__(self) -> None:
        self.flow_active = True
        self._thread = None
        self._committed_offset: dict[Any, int | None] = {ROUTED0: 10, CHANGELOG0: 0}
        self.highwaters: dict[Any, int] = {ROUTED0: 10, CHANGELOG0: 99}
        self.sought: list[tuple[Any, int]] = []

    def assignment(self) -> set[Any]:
        return {ROUTED0, CHANGELOG0}

    def highwater(self, tp: Any) -> int:
        return self.highwaters[tp]

    async def seek(self, tp: Any, offset: int) -> None:
        self.sought.append((tp, offset))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(workarounds.time, "monotonic", lambda: now[0])
    return now


def make() -> tuple[StallWatchdog, FakeConsumer]:
    consumer = FakeConsumer()
    app = SimpleNamespace(
        consumer=consumer, rebalancing=False,
        tables=SimpleNamespace(recovery=SimpleNamespace(in_recovery=False),
                               changelog_topics={CHANGELOG0.topic}))
    return StallWatchdog(app, stall_s=5.0, max_wait_s=20.0), consumer


def check(dog: StallWatchdog) -> list[Any]:
    return asyncio.run(dog.check())


def test_caught_up_partition_is_left_alone(clock: list[float]) -> None:
    dog, consumer = make()
    consumer.highwaters[ROUTED0] = 11  # one past the commit: a transaction marker at the end
    check(dog)
    clock[0] += 60
    assert check(dog) == [] and consumer.sought == []


def test_stalled_partition_is_sought_back_with_backoff(clock: list[float]) -> None:
    dog, consumer = make()
    consumer.highwaters[ROUTED0] = 50
    assert check(dog) == []  # first sight: starts the clock
    clock[0] += 4
    assert check(dog) == []
    clock[0] += 1.5
    assert check(dog) == [ROUTED0]
    assert consumer.sought == [(ROUTED0, 10)] and dog.reseeks == 1
    clock[0] += 6  # did not help: the next try waits twice as long
    assert check(dog) == []
    clock[0] += 5
    assert check(dog) == [ROUTED0]
    assert [tp for tp, _ in consumer.sought] == [ROUTED0, ROUTED0]  # never the changelog


def test_progress_or_recent_records_reset_the_clock(clock: list[float]) -> None:
    dog, consumer = make()
    consumer.highwaters[ROUTED0] = 50
    check(dog)
    clock[0] += 4
    dog.saw(ROUTED0)  # the agent is processing this partition
    clock[0] += 4
    assert check(dog) == []
    consumer._committed_offset[ROUTED0] = 20  # the commit moved
    clock[0] += 4.9
    assert check(dog) == []
    clock[0] += 5.1
    assert check(dog) == [ROUTED0] and consumer.sought == [(ROUTED0, 20)]


def test_nothing_happens_during_a_rebalance(clock: list[float]) -> None:
    dog, consumer = make()
    consumer.highwaters[ROUTED0] = 50
    check(dog)
    dog.app.rebalancing = True
    clock[0] += 60
    assert check(dog) == [] and consumer.sought == []
