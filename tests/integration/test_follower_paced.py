"""core.follower's paced mode (the executor's followers) on the real broker: records produced in a
steady trickle while the follower reads in rounds (unassigned between rounds) all arrive, once
each and in order per partition; a since_s reader gets only the recent ones; readiness holds."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest
from confluent_kafka import Message, Producer

from fleetplane.core.follower import Follower
from fleetplane.core.settings import Settings
from tests.integration.test_idle_follower import (  # noqa: F401
    PARTITIONS,
    Got,
    produce,
    topic,
    wait_for,
)


@pytest.fixture
def paced(base_settings: Settings, unique: str) -> Iterator[Follower]:
    f = Follower(base_settings, f"paced-{unique}", pace_s=0.05)
    yield f
    f.close()


def test_a_paced_follower_gets_a_trickle_once_each_in_order(
        base_settings: Settings, topic: str, paced: Follower) -> None:  # noqa: F811
    produce(base_settings, topic, [f"old-{i:03d}" for i in range(5)])
    everything = Got()
    by_partition: dict[int, list[int]] = defaultdict(list)
    lock = threading.Lock()

    def note(msg: Message) -> None:
        everything(msg)
        with lock:
            by_partition[msg.partition() or 0].append(msg.offset() or 0)

    reader = paced.follow("all", [topic], note)
    paced.start()
    assert reader.ready.wait(60)
    assert sorted(everything.snapshot()) == [f"old-{i:03d}" for i in range(5)]
    sent = []
    producer = Producer(base_settings.producer_config())  # one producer for the whole trickle
    for i in range(40):  # a trickle across many rounds
        batch = [f"t{i:03d}-{j}" for j in range(3)]
        for v in batch:
            producer.produce(topic, key=v.encode(), value=v.encode())
        assert producer.flush(30) == 0
        sent += batch
        time.sleep(0.02)
    wait_for(lambda: set(sent) <= set(everything.snapshot()), "the trickle")
    time.sleep(0.3)  # a few more rounds: nothing comes twice
    got = everything.snapshot()
    assert sorted(got) == sorted([f"old-{i:03d}" for i in range(5)] + sent)
    for offsets in by_partition.values():
        assert offsets == sorted(offsets) and len(offsets) == len(set(offsets))
    assert paced.rounds > 1  # it did read in rounds (unassigned and assigned again)
    assert paced.idle is None  # and not with the idle backoff


def test_caught_up_right_after_assignment_waits_for_every_partition(
        base_settings: Settings, topic: str, unique: str) -> None:  # noqa: F811
    """caught_up() called as soon as the follower is assigned (the executor's first lease
    sync) returns once every partition was read to its end, with the records already there
    given to the reader: it used to look only at the partitions read so far, none that early,
    and returned at once (stop 27's CI failure of test_executor_lease_sync)."""
    produce(base_settings, topic, [f"early-{i:02d}" for i in range(12)])
    follower = Follower(base_settings, f"early-{unique}", pace_s=3.0)
    got = Got()

    def slow(msg: Message) -> None:  # a reader that takes its time (a loaded machine)
        time.sleep(0.05)
        got(msg)

    follower.follow("all", [topic], slow)
    follower.start()
    try:
        assert follower.assigned.wait(60)
        assert follower.caught_up(30)
        assert {p for _t, p in follower.positions} == set(range(PARTITIONS))
        assert sorted(got.snapshot()) == [f"early-{i:02d}" for i in range(12)]
    finally:
        follower.close()
