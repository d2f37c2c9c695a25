"""The reconciler's wait between passes (Reconciler.next_wait): the scan interval while work
is in sight, a growing wait (capped) while the fleet is idle."""

from __future__ import annotations

from fleetplane.core import events as ev
from fleetplane.core.settings import Settings
from fleetplane.core.topics import OUTCOMES, SUBMITTED
from fleetplane.reconciler.main import IDLE_SCAN_CAP_S, Reconciler

from .test_reconciler_tracker import SPEC, see


def reconciler(scan_s: float = 2.0, deadline_s: float = 30.0) -> Reconciler:
    return Reconciler(Settings(reconciler_scan_s=scan_s, reconciler_deadline_s=deadline_s))


def test_an_idle_fleet_is_read_less_and_less_often_up_to_the_cap() -> None:
    r = reconciler()
    waits = [2.0]
    for _ in range(5):
        waits.append(r.next_wait(waits[-1]))
    assert waits == [2.0, 4.0, 8.0, IDLE_SCAN_CAP_S, IDLE_SCAN_CAP_S, IDLE_SCAN_CAP_S]
    # the cap is at most a third of the deadline (and never below the scan interval)
    assert reconciler(deadline_s=6.0).next_wait(2.0) == 2.0
    assert reconciler(scan_s=0.5, deadline_s=3.0).next_wait(0.5) == 1.0


def test_records_read_or_a_task_waiting_at_a_hop_keep_the_scan_interval() -> None:
    r = reconciler()
    r.read_last_pass = 3
    assert r.next_wait(IDLE_SCAN_CAP_S) == 2.0
    r.read_last_pass = 0
    submitted = ev.TaskSubmitted(task_id="t1", team="a", spec=SPEC)
    see(r.tracker, submitted, SUBMITTED, 0, now=0)  # waits at ingest
    assert r.next_wait(IDLE_SCAN_CAP_S) == 2.0
    see(r.tracker, ev.TaskCompleted(task_id="t1", team="a", attempt=1, model="m", output="o",
                                    cost_usd=0.0, duration_ms=1), OUTCOMES, 0, now=1)
    assert r.next_wait(2.0) == 4.0  # finished: idle again
