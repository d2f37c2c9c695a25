"""A budget hold survives a router restart that reads the task topics only from its lookback
(``FLEETPLANE_ROUTER_REBUILD_LOOKBACK_S``): the hold comes from router.holds, and a released
hold is not released again after the next restart (its tombstone). The router as an OS process
on the real broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import Settings
from fleetplane.core.topics import LIFECYCLE, OUTCOMES, ROUTED

from .test_router import RouterProcess, Tail, accepted

LOOKBACK_S = 2.0


@pytest.fixture
def router(base_settings: Settings, tmp_path: Path) -> Iterator[RouterProcess]:
    r = RouterProcess(base_settings, tmp_path)
    r.env["FLEETPLANE_ROUTER_REBUILD_LOOKBACK_S"] = str(LOOKBACK_S)
    # a group of its own: the session's fleetplane-router group still holds the previous test's
    # router as a static member, which the embedded broker did not expire within 60 s
    r.env["FLEETPLANE_ROUTER_GROUP_ID"] = f"router-holds-{uuid.uuid4().hex[:8]}"
    r.start()
    try:
        yield r
    finally:
        assert r.stop() == 0, r.log()


def status(team: str, remaining: float) -> ev.BudgetStatus:
    return ev.BudgetStatus(task_id="", team=team, period="month", budget_usd=10.0,
                           spent_usd=10.0 - remaining, remaining_usd=remaining,
                           state="exhausted" if remaining <= 0 else "ok")


def restart_past_the_lookback(router: RouterProcess) -> None:
    """Stop, let everything written so far fall out of the lookback, start."""
    assert router.stop() == 0, router.log()
    time.sleep(LOOKBACK_S + 1.5)
    router.start()
    assert "router state rebuilt" in router.log()


def test_a_hold_older_than_the_lookback_is_released_after_a_restart(
        router: RouterProcess, base_settings: Settings, producer: EventProducer,
        unique: str) -> None:
    team, marker = f"team-{unique}", f"{unique}-marker"
    tail = Tail(base_settings, ROUTED, LIFECYCLE, OUTCOMES)
    try:
        producer.send([status(team, 0.0)])
        # the status and the submission travel on different topics: the router may read the
        # submission first and route it; submit until one is held
        for k in range(10):
            held_id = f"{unique}-held-{k}"
            submitted = accepted(held_id, team, "summarize", "held for the month",
                                 labels={"fleetplane/cache": "off"})
            producer.send([submitted])
            first = tail.wait_for(held_id, (ev.TaskHeld, ev.TaskRouted))
            if isinstance(first, ev.TaskHeld):
                break
            time.sleep(1.0)
        assert isinstance(first, ev.TaskHeld) and first.kind == "budget", first
        time.sleep(1.0)  # the hold's transaction committed

        # its TaskHeld is now older than the lookback: only router.holds knows it
        restart_past_the_lookback(router)
        producer.send([status(team, 5.0)])
        released = tail.wait_for(held_id, ev.TaskRouted)
        assert "released from the budget hold" in released.reason
        assert released.spec == submitted.spec and released.attempt == 1
        time.sleep(1.0)  # the release's transaction (with the tombstone) committed

        # the released hold is over: the next restart does not release it again
        restart_past_the_lookback(router)
        producer.send([status(team, 0.0)])
        producer.send([status(team, 5.0)])
        producer.send([accepted(marker, team, "summarize", "after the release",
                                labels={"fleetplane/cache": "off"})])
        tail.wait_for(marker, (ev.TaskRouted, ev.TaskHeld))
        tail.drain(3.0)  # the statuses are on another topic: give them time to be handled
        again = [e for e in tail.events
                 if e.task_id == held_id and isinstance(e, ev.TaskRouted)]
        assert len(again) == 1, again
    finally:
        tail.close()

