"""The reconciler reads the task topics from its lookback, not from the start
(``FLEETPLANE_RECONCILER_LOOKBACK_S``, docs/operations.md "Reconciler"): its start-up and memory
stay bounded however many days the topics keep. A broker of its own, so that the records' ages
are the test's: two-day-old accepted tasks are not read, this hour's are."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from fleetplane.core import events as ev
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ACCEPTED
from fleetplane.reconciler.main import Reconciler
from tests.own_broker import publish_aged, settings_on_own_broker

DAY_MS = 86_400_000


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    with settings_on_own_broker(tmp_path / "broker") as s:
        yield s


def publish(settings: Settings, tasks: list[str], age_ms: int) -> None:
    """TaskAccepted records whose timestamp (CreateTime) is `age_ms` ago."""
    publish_aged(settings, [ev.TaskAccepted(task_id=tid, team="t", spec=ev.TaskSpec(
        name=tid, task_type="summarize", prompt="p")) for tid in tasks], age_ms / 1000)


def tracked(settings: Settings, lookback_s: float) -> set[str]:
    reconciler = Reconciler(settings.model_copy(update={"reconciler_lookback_s": lookback_s}))
    reconciler.open()
    try:
        assert reconciler.catch_up()
        return set(reconciler.tracker.tracks)
    finally:
        reconciler.close()


def test_a_start_reads_the_lookback_only(settings: Settings) -> None:
    old = [f"old-{i}" for i in range(30)]
    new = [f"new-{i}" for i in range(30)]
    publish(settings, old, age_ms=2 * DAY_MS)
    publish(settings, new, age_ms=60_000)
    assert tracked(settings, lookback_s=86_400) == set(new)
    assert tracked(settings, lookback_s=0) == set(old) | set(new)  # 0: from the start


def test_the_router_hop_is_judged_by_the_configured_group(settings: Settings) -> None:
    """With ``FLEETPLANE_ROUTER_GROUP_ID`` set, the router's progress is that group's committed
    offsets (the default group's, which has none here, would leave the hop unjudged)."""
    publish(settings, [f"t-{i}" for i in range(5)], age_ms=1_000)
    group = "router-side-by-side"
    c = Consumer({**settings.client_config(), "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.list_topics(ACCEPTED, timeout=10).topics[ACCEPTED].partitions
        c.commit(offsets=[TopicPartition(ACCEPTED, p, 1) for p in parts], asynchronous=False)
    finally:
        c.close()
    reconciler = Reconciler(settings.model_copy(update={"router_group_id": group}))
    reconciler.open()
    try:
        committed = reconciler.committed()
    finally:
        reconciler.close()
    assert {k: v for k, v in committed.items() if k[0] == ACCEPTED} == {
        (ACCEPTED, p): 1 for p in parts}
