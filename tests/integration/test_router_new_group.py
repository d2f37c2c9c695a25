"""A brand-new router group (a renamed group, offsets the broker expired) does not re-route the
whole retention of tasks.accepted: it starts at the records of the last
``FLEETPLANE_ROUTER_NEW_GROUP_LOOKBACK_S`` (docs/routing.md, "A new group"). Re-routing a task
the coordinator has already forgotten would run it again. The router as an OS process."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from fleetplane.core import events as ev
from fleetplane.core.settings import Settings
from fleetplane.core.topics import LIFECYCLE, OUTCOMES, ROUTED
from tests.own_broker import publish_aged

from .test_router import RouterProcess, Tail, accepted

LOOKBACK_S = 2.0


def test_a_new_group_routes_the_recent_submissions_not_the_old_ones(
        base_settings: Settings, tmp_path: Path, unique: str) -> None:
    team = f"team-{unique}"
    old = [accepted(f"{unique}-old-{i}", team, "summarize", f"old {i}",
                    labels={"fleetplane/cache": "off"}) for i in range(5)]
    recent = [accepted(f"{unique}-recent-{i}", team, "summarize", f"recent {i}",
                       labels={"fleetplane/cache": "off"}) for i in range(5)]
    publish_aged(base_settings, old, age_s=3 * 3600)  # accepted 3 h ago, never routed
    # (a short lookback, so that no earlier test's submission on the session's broker is in it)
    time.sleep(LOOKBACK_S + 1)
    tail = Tail(base_settings, ROUTED, LIFECYCLE, OUTCOMES)
    router = RouterProcess(base_settings, tmp_path)
    router.env["FLEETPLANE_ROUTER_GROUP_ID"] = f"router-new-{uuid.uuid4().hex[:8]}"
    router.env["FLEETPLANE_ROUTER_NEW_GROUP_LOOKBACK_S"] = str(LOOKBACK_S)
    router.start()
    try:
        publish_aged(base_settings, recent, age_s=0)  # the new group goes on with new work
        for e in recent:
            tail.wait_for(e.task_id, ev.TaskRouted)
        tail.drain(3.0)
        routed_old = [e.task_id for e in tail.events
                      if isinstance(e, ev.TaskRouted) and e.task_id.startswith(f"{unique}-old")]
        assert routed_old == []
        assert "new consumer group positioned" in router.log()
    finally:
        tail.close()
        assert router.stop() == 0, router.log()
