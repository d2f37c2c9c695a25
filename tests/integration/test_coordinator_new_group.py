"""A brand-new coordinator group (renamed, or its offsets expired by the broker after a long
stop) does not replay tasks.routed's whole retention: it starts at the terminal retention
(docs/coordinator.md, "A new group"). A TaskRouted older than that belongs to a task the
coordinator may have finished and forgotten, which a replay would run again. A broker of its
own, so that the group is new and the records' ages are the test's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetplane.core import events as ev
from fleetplane.core.settings import Settings
from fleetplane.core.topics import DISPATCH
from tests.own_broker import publish_aged, settings_on_own_broker

from .test_coordinator import CoordinatorProcess, Tail, routed

DAY_S = 86_400


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    with settings_on_own_broker(tmp_path / "broker") as s:
        yield s


def test_a_new_group_does_not_dispatch_routings_older_than_the_retention(
        settings: Settings, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    # routed ten days ago: finished and forgotten (7 days) by a coordinator that ran then
    publish_aged(settings, [routed(f"{run}-old-{i}") for i in range(5)], age_s=10 * DAY_S)
    publish_aged(settings, [routed(f"{run}-recent-{i}") for i in range(5)], age_s=60)
    dispatch = Tail(settings, DISPATCH)
    (tmp_path / "c").mkdir()
    coordinator = CoordinatorProcess(settings, tmp_path / "c", instance_id=f"t-{run}")
    coordinator.start()
    try:
        coordinator.wait_ready()
        recent = dispatch.wait_for(f"{run}-recent", 5, ev.TaskDispatched, linger_s=3.0)
        assert len(recent) == 5
        assert dispatch.events(f"{run}-old") == []
    finally:
        dispatch.close()
        coordinator.terminate()
