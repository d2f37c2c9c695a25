"""Finished tasks leave the coordinator's table after a retention, or beyond a cap of terminal
rows (docs/coordinator.md, "Forgetting finished tasks"): the table, the memory and a failover's
restore stay bounded however many tasks the fleet has run."""

from __future__ import annotations

from datetime import timedelta

from fleetplane.coordinator import scheduler
from fleetplane.coordinator.state import Status, TaskRow
from fleetplane.coordinator.world import World, task_key
from fleetplane.core import events as ev
from tests.unit.test_coordinator_scheduler import Harness, dispatched, held

HOUR_MS = 3_600_000


def table_of(h: Harness, table: dict[bytes, bytes] | None = None) -> dict[bytes, bytes]:
    """The changelog table after the rows changed since the last call (tombstones delete)."""
    table = {} if table is None else table
    for key, value in h.world.take_rows():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return table


def test_a_finished_task_is_forgotten_after_the_retention_and_a_live_one_never() -> None:
    h = Harness(terminal_retention_ms=HOUR_MS, terminal_max_rows=0)
    h.route("done", scope=["a/**"])
    h.route("running", scope=["b/**"])
    h.route("waiting", scope=["c/**"], depends_on=["never"])
    h.done("done", output="out")
    table = table_of(h)
    assert task_key("done") in table

    h.tick(3_599.0)  # within the hour: kept, and a late duplicate is still absorbed
    assert h.state("done") is Status.COMPLETED
    assert h.done("done") == [] and h.route("done", scope=["a/**"]) == []
    table_of(h, table)

    h.tick(2.0)
    assert "done" not in h.world.tasks and h.world.terminal == 0
    assert h.state("running") is Status.DISPATCHED  # active: never forgotten
    assert h.scheduler.forgotten == 1
    table_of(h, table)
    assert task_key("done") not in table and task_key("running") in table

    restored = World.load(table.items())  # a restart or a failover reads the same
    assert set(restored.tasks) == {"running", "waiting"} and restored.terminal == 0
    h.tick(7_200.0)  # hours later: a task that has not ended stays, whatever it waits for
    assert h.state("waiting") is Status.WAITING


def test_the_oldest_finished_tasks_go_first_beyond_the_cap() -> None:
    h = Harness(terminal_retention_ms=0, terminal_max_rows=2)
    for i in range(5):
        h.route(f"t{i}", scope=[f"t{i}/**"])
    for i in range(5):
        h.now += timedelta(seconds=1)
        h.done(f"t{i}")
    assert h.world.terminal == 5
    h.tick(1.0)
    assert sorted(h.world.tasks) == ["t3", "t4"] and h.world.terminal == 2
    h.tick(1.0)
    assert sorted(h.world.tasks) == ["t3", "t4"]  # at the cap: nothing more goes


def test_a_finished_row_written_again_is_kept_from_its_last_write() -> None:
    h = Harness(terminal_retention_ms=HOUR_MS, terminal_max_rows=0)
    h.route("t1")
    h.done("t1")
    h.tick(1_800.0)
    # a late completion of the same attempt carrying a cost: charged, remembered in the row
    h.send(ev.TaskCompleted(task_id="t1", team="a", attempt=1, model="m", output="again",
                            cost_usd=0.5, duration_ms=1, occurred_at=h.now))
    h.tick(1_801.0)  # an hour after the task ended, half an hour after the row's last write
    assert h.state("t1") is Status.COMPLETED
    h.tick(1_800.0)
    assert "t1" not in h.world.tasks


def test_a_dependency_on_a_forgotten_task_waits_and_says_why() -> None:
    h = Harness(terminal_retention_ms=HOUR_MS, terminal_max_rows=0)
    h.route("dep", scope=["d/**"])
    h.done("dep", output="D")
    out = h.route("soon", scope=["s/**"], depends_on=["dep"])  # within the retention
    assert dispatched(out) == ["soon"] and out[-1].inputs == {"dep": "D"}  # type: ignore[attr-defined]
    h.tick(3_601.0)
    assert "dep" not in h.world.tasks
    [hold] = held(h.route("late", scope=["l/**"], depends_on=["dep"]))
    assert (hold.kind, hold.held_by) == ("dependency", "dep")
    assert "dep" in hold.reason and "retention" in hold.reason


def test_a_forget_undone_with_its_event_leaves_the_row_and_writes_no_tombstone() -> None:
    h = Harness(terminal_retention_ms=HOUR_MS, terminal_max_rows=0)
    h.route("t1")
    h.done("t1")
    h.world.take_rows()
    world = h.world
    world.begin()
    assert world.forget_ended(float("inf"), 0, 10) == ["t1"]
    assert "t1" not in world.tasks and world.terminal == 0
    world.rollback()  # the event that forgot it failed (Scheduler.apply rolls back)
    assert world.tasks["t1"].status is Status.COMPLETED and world.terminal == 1
    assert world.take_rows() == []
    world.begin()
    assert world.forget_ended(float("inf"), 0, 10) == ["t1"]  # its heap entry is back
    world.commit()
    assert world.take_rows() == [(task_key("t1"), None)]


def test_at_most_a_bounded_number_are_forgotten_per_tick() -> None:
    h = Harness(terminal_retention_ms=1_000, terminal_max_rows=0)
    world = h.world
    for i in range(scheduler.FORGET_PER_TICK + 10):
        world.put(TaskRow(task_id=f"x{i}", team="a", status=Status.COMPLETED,
                          outcome="TaskCompleted", updated_at=h.now))
    h.tick(5.0)  # one tick's transaction stays small
    assert h.scheduler.forgotten == scheduler.FORGET_PER_TICK and world.terminal == 10
    h.tick(0.5)
    assert world.terminal == 0
