"""The reconciler's decisions (fleetplane.reconciler.tracker): pure, from records to re-drives."""

from __future__ import annotations

from fleetplane.core import events as ev
from fleetplane.core.topics import ACCEPTED, DISPATCH, OUTCOMES, ROUTED, SUBMITTED
from fleetplane.reconciler.tracker import GiveUp, Redrive, Tracker

SPEC = ev.TaskSpec(name="t", task_type="summarize", prompt="p")


def see(tr: Tracker, event: ev.Event, topic: str, offset: int, now: float) -> None:
    tr.observe(event, topic=topic, partition=0, offset=offset, key=event.task_id.encode(),
               value=b"v" + str(offset).encode(), headers=(), now=now)


def accepted(task: str = "t1") -> ev.TaskAccepted:
    return ev.TaskAccepted(task_id=task, team="a", spec=SPEC)


def routed(task: str = "t1", attempt: int = 1) -> ev.TaskRouted:
    return ev.TaskRouted(task_id=task, team="a", spec=SPEC, attempt=attempt, model="m",
                         provider="anthropic", tier="small", reason="r")


def test_accepted_task_the_router_read_and_never_answered_is_re_driven_after_the_deadline(
        ) -> None:
    tr = Tracker()
    see(tr, ev.TaskSubmitted(task_id="t1", team="a", spec=SPEC), SUBMITTED, 3, now=0)
    a = accepted()
    see(tr, a, ACCEPTED, 7, now=1)
    committed = {(ACCEPTED, 0): 8, (SUBMITTED, 0): 4}
    assert tr.due(committed, 20, deadline_s=30, max_redrives=3) == []  # before the deadline
    (action,) = tr.due(committed, 31, deadline_s=30, max_redrives=3)
    assert isinstance(action, Redrive)
    assert (action.hop, action.task_id, action.attempt) == ("router", "t1", 1)
    assert action.fact.value == b"v7" and action.fact.event_id == a.event_id
    assert "TaskAccepted" in action.reason
    # the next deadline counts from the re-drive
    assert tr.due(committed, 40, deadline_s=30, max_redrives=3) == []


def test_a_hop_whose_group_has_not_read_the_record_is_slow_not_lost() -> None:
    tr = Tracker()
    see(tr, accepted(), ACCEPTED, 7, now=0)
    assert tr.due({(ACCEPTED, 0): 7}, 1000, deadline_s=30, max_redrives=3) == []
    assert tr.due({}, 1000, deadline_s=30, max_redrives=3) == []


def test_answered_held_and_finished_tasks_are_left_alone() -> None:
    tr = Tracker()
    see(tr, accepted("r"), ACCEPTED, 1, now=0)
    see(tr, routed("r"), ROUTED, 1, now=0)
    tr.row(b"task/r", True)  # the coordinator recorded it
    see(tr, accepted("h"), ACCEPTED, 2, now=0)
    see(tr, ev.TaskHeld(task_id="h", team="a", reason="budget", kind="budget"), "tasks.lifecycle",
        5, now=0)
    see(tr, accepted("c"), ACCEPTED, 3, now=0)
    see(tr, ev.TaskCompleted(task_id="c", team="a", attempt=1, model="m", cached=True,
                             output="x", cost_usd=0.0, duration_ms=1), OUTCOMES, 4, now=0)
    committed = {(ACCEPTED, 0): 10, (ROUTED, 0): 10}
    assert tr.due(committed, 1000, deadline_s=30, max_redrives=3) == []
    assert "c" in tr.finished and "c" not in tr.tracks
    # a late record of a finished task does not bring it back
    see(tr, accepted("c"), ACCEPTED, 9, now=0)
    assert "c" not in tr.tracks


def test_routed_task_the_coordinator_never_recorded_is_re_driven() -> None:
    tr = Tracker()
    see(tr, accepted(), ACCEPTED, 1, now=0)
    r = routed()
    see(tr, r, ROUTED, 4, now=0)
    (action,) = tr.due({(ACCEPTED, 0): 2, (ROUTED, 0): 5}, 31, deadline_s=30, max_redrives=3)
    assert isinstance(action, Redrive) and action.hop == "coordinator"
    assert action.fact.event_id == r.event_id
    # once dispatched, nothing more to do
    see(tr, ev.TaskDispatched(task_id="t1", team="a", attempt=1, spec=SPEC, model="m",
                              provider="anthropic", tier="small"), DISPATCH, 1, now=40)
    assert tr.due({(ROUTED, 0): 9}, 100, deadline_s=30, max_redrives=3) == []


def test_re_drives_back_off_and_an_operator_is_alerted_once_after_max_redrives() -> None:
    tr = Tracker()
    see(tr, accepted(), ACCEPTED, 1, now=0)
    committed = {(ACCEPTED, 0): 2}
    kinds = []
    for t in range(0, 400):
        kinds += [(t, type(a).__name__) for a in
                  tr.due(committed, t, deadline_s=30, max_redrives=2)]
    # after 30 s, then 60 s later, then 120 s later (with the alert), then 240 s later
    assert kinds == [(30, "Redrive"), (90, "Redrive"), (210, "GiveUp"), (210, "Redrive")]
    assert isinstance(GiveUp("router", "t1", "a", "x"), GiveUp)


def test_a_re_published_record_resets_the_fact_to_its_new_offset() -> None:
    tr = Tracker()
    a = accepted()
    see(tr, a, ACCEPTED, 1, now=0)
    assert len(tr.due({(ACCEPTED, 0): 2}, 31, deadline_s=30, max_redrives=3)) == 1
    see(tr, a, ACCEPTED, 12, now=32)  # the re-published copy, read back
    # the router has not read the copy yet: nothing to do however long it takes
    assert tr.due({(ACCEPTED, 0): 12}, 500, deadline_s=30, max_redrives=3) == []
    (again,) = tr.due({(ACCEPTED, 0): 13}, 500, deadline_s=30, max_redrives=3)
    assert isinstance(again, Redrive) and again.attempt == 2 and again.fact.offset == 12


def test_a_record_the_service_dead_lettered_is_answered_not_re_driven() -> None:
    tr = Tracker()
    bad = ev.TaskSubmitted(task_id="t1", team="a", spec=SPEC)
    see(tr, bad, SUBMITTED, 3, now=0)
    tr.observe(ev.DeadLetter(task_id="t1", team="a", service="ingest", source_topic=SUBMITTED,
                             source_partition=0, source_offset=3, payload=b"x",
                             error_class="Rejected", reason="task_id: too long"),
               topic="fleet.dlq", partition=0, offset=0, key=b"t1", value=b"d", headers=(),
               now=1)
    assert tr.due({(SUBMITTED, 0): 4}, 1000, deadline_s=30, max_redrives=3) == []


def test_a_group_whose_committed_offset_stands_still_is_stalled_and_its_records_re_driven(
        ) -> None:
    """make chaos: after the broker's SIGKILL the router's read_committed fetch from its
    committed offset was answered with the partition's end; it never read 90 accepted tasks
    and never committed past them. A backlog moves the committed offset; a stall does not."""
    tr = Tracker()
    see(tr, accepted("t1"), ACCEPTED, 7, now=0)
    see(tr, accepted("t2"), ACCEPTED, 9, now=0)
    stuck = {(ACCEPTED, 0): 7}
    assert tr.due(stuck, 10, deadline_s=10, max_redrives=3) == []
    assert tr.due(stuck, 40, deadline_s=10, max_redrives=3) == []  # 30 s: not yet 4 deadlines
    actions = tr.due(stuck, 51, deadline_s=10, max_redrives=3)
    assert {(a.hop, a.task_id) for a in actions if isinstance(a, Redrive)} == {
        ("router", "t1"), ("router", "t2")}
    assert all("has not moved" in a.reason for a in actions)


def test_a_backlog_whose_committed_offset_moves_is_slow_not_stalled() -> None:
    tr = Tracker()
    see(tr, accepted("t1"), ACCEPTED, 900, now=0)
    for i, now in enumerate(range(10, 300, 10)):
        assert tr.due({(ACCEPTED, 0): 10 + i}, now, deadline_s=10, max_redrives=3) == []


def test_memory_is_bounded_by_time_and_a_finished_task_stays_finished_for_at_least_that_long(
        ) -> None:
    """``memory_s`` (reconciler_lookback_s): a finished id is remembered for at least that
    long and at most twice; a track with no new record for that long goes (a restart, reading
    the topics from that far back, would not know it either)."""
    tr = Tracker(memory_s=100, now=0)
    see(tr, accepted("done"), ACCEPTED, 1, now=0)
    see(tr, ev.TaskCompleted(task_id="done", team="a", attempt=1, model="m", output="x",
                             cost_usd=0.0, duration_ms=1), OUTCOMES, 1, now=0)
    see(tr, accepted("stuck"), ACCEPTED, 2, now=0)
    see(tr, accepted("fresh"), ACCEPTED, 3, now=150)
    assert tr.forget(now=150) == 1 and set(tr.tracks) == {"fresh"}
    see(tr, accepted("done"), ACCEPTED, 9, now=200)  # a late copy: still finished
    assert "done" not in tr.tracks and "done" in tr.finished
    assert tr.forget(now=250) == 1 and tr.tracks == {}  # "fresh": no record for 100 s
    assert "done" in tr.finished  # ids outlive tracks by ID_MARGIN_S
    tr.forget(now=420)
    assert "done" not in tr.finished and len(tr.finished) == 0  # after 420 s (>= 160)


def test_without_memory_s_nothing_is_forgotten() -> None:
    tr = Tracker()
    see(tr, accepted("stuck"), ACCEPTED, 2, now=0)
    assert tr.forget(now=10**9) == 0 and set(tr.tracks) == {"stuck"}
