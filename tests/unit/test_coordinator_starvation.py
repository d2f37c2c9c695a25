"""No starvation (issue 12, Build 2): a broad write scope waiting behind a stream of narrow
overlapping ones is admitted within a bounded number of releases, because the oldest waiter of a
repository held by a conflict reserves its scope (younger overlapping tasks wait for it)."""

from __future__ import annotations

from fleetplane.coordinator.state import Status
from fleetplane.core import events as ev
from tests.unit.test_coordinator_scheduler import Harness, dispatched, held


def stream(h: Harness, releases: int) -> int | None:
    """Narrow tasks (one file each in src/a) arrive one per release while a broad task (src/**)
    waits; returns after how many releases the broad task was dispatched (None: never)."""
    h.route("n0", scope=["src/a/f0.py"])
    h.route("n1", scope=["src/a/f1.py"])
    out = h.route("broad", scope=["src/**"])
    assert held(out)[0].kind == "conflict"
    running = ["n0", "n1"]
    for k in range(2, releases + 2):
        h.route(f"n{k}", scope=[f"src/a/f{k}.py"])
        if h.state(f"n{k}") is Status.DISPATCHED:
            running.append(f"n{k}")
        out = h.done(running.pop(0))
        if "broad" in dispatched(out):
            return k - 1
    return None


def test_a_broad_scope_is_admitted_within_bounded_releases() -> None:
    h = Harness()
    after = stream(h, releases=50)
    # it waited for the two leases active when it arrived, and for the two admitted before it
    # was passed over the first time (then its reservation holds every younger one back)
    assert after is not None and after <= 4
    reserved = [e for e in h.log if isinstance(e, ev.TaskHeld) and e.kind == "reserved"]
    assert reserved and all(e.held_by == "broad" for e in reserved)
    assert "reserved by task broad" in reserved[0].reason
    # the narrow tasks that waited for the reservation run once the broad task is done
    waiting = sorted(e.task_id for e in reserved)
    assert all(h.state(t) is Status.WAITING for t in waiting)
    out = h.done("broad")
    assert set(waiting) <= set(dispatched(out))


def test_without_reservations_the_broad_scope_starves() -> None:
    """The behaviour the reservation fixes (the scheduler before it): 50 releases, never."""
    h = Harness(reservations=False)
    assert stream(h, releases=50) is None


def passed_over(h: Harness) -> None:
    """broad (src/**) waits for n0; n1 is admitted meanwhile; n0 ends: broad now waits for a
    lease admitted after it began to wait (passed over), so it reserves src/** in r1."""
    h.route("n0", scope=["src/a/f0.py"])
    assert held(h.route("broad", scope=["src/**"]))[0].held_by == "n0"
    assert dispatched(h.route("n1", scope=["src/a/f1.py"])) == ["n1"]  # not starving yet
    h.done("n0")
    assert h.world.tasks["broad"].held_by == "n1" and h.world.tasks["broad"].passed_over


def test_a_reservation_blocks_only_overlapping_younger_tasks() -> None:
    h = Harness()
    passed_over(h)
    assert dispatched(h.route("docs", scope=["docs/**"])) == ["docs"]  # no overlap
    assert dispatched(h.route("other-repo", scope=["src/**"], repo="r2")) == ["other-repo"]
    [hold] = held(h.route("n2", scope=["src/b/x.py"]))
    assert hold.kind == "reserved" and hold.held_by == "broad"


def test_waiting_for_an_older_lease_reserves_nothing() -> None:
    """A long lease that was there first (invariant 5): tasks overlapping its waiters but not
    the lease itself still run."""
    h = Harness()
    h.route("long", scope=["src/**"])
    assert held(h.route("w", scope=["src/a/**", "docs/**"]))[0].held_by == "long"
    assert dispatched(h.route("d", scope=["docs/x.md"])) == ["d"]


def test_a_reservation_lapses_when_the_reserver_is_cancelled() -> None:
    h = Harness()
    passed_over(h)
    assert held(h.route("n2", scope=["src/a/f2.py"]))[0].kind == "reserved"
    out = h.control("cancel", "broad", team="a")
    assert dispatched(out) == ["n2"]


def test_the_reservation_survives_a_restart() -> None:
    from fleetplane.coordinator.world import World
    h = Harness()
    passed_over(h)
    h.route("n2", scope=["src/a/f2.py"])
    h.world = World.load(h.world.take_rows())
    assert held(h.route("n3", scope=["src/a/f3.py"]))[0].held_by == "broad"
    out = h.done("n1")
    assert dispatched(out) == ["broad"]


def test_reservations_keep_leases_apart_and_everything_ends() -> None:
    """The simulated workloads of the replay test, with reservations: no two overlapping
    leases in a repository are ever active together, and every task ends (no deadlock)."""
    import pytest

    from fleetplane.coordinator.globs import scope_overlap
    from fleetplane.coordinator.scheduler import Scheduler
    from fleetplane.coordinator.world import World
    from tests.unit.coordinator_logs import simulate
    from tests.unit.test_coordinator_replay import WORKLOADS, policy

    class Checked(Scheduler):
        reserved = 0
        world = World()

        def apply(self, world: World, event: ev.Event, **kw: object) -> list[ev.Event]:
            out = super().apply(world, event)
            Checked.world = world
            Checked.reserved += sum(isinstance(e, ev.TaskHeld) and e.kind == "reserved"
                                    for e in out)
            active = sorted(world.active.values(), key=lambda s: s.task_id)
            for i, a in enumerate(active):
                for b in active[i + 1:]:
                    if a.repository == b.repository and \
                            scope_overlap(a.leased_paths, b.leased_paths):
                        pytest.fail(f"{a.task_id} and {b.task_id} overlap in {a.repository}")
            return out

    for name, (w, seed) in sorted(WORKLOADS.items()):
        p = policy(w).__class__(**{**policy(w).__dict__, "reservations": True})
        assert simulate(Checked(p), w, seed)
        left = {(s.status.value, s.hold_kind) for s in Checked.world.tasks.values()
                if not s.terminal}
        # what is left waits for a person (approval), money (the team's budget) or a
        # dependency that waits for those: nothing waits for a lease or a reservation
        assert left <= {("waiting", "approval"), ("waiting", "budget"),
                        ("waiting", "dependency")}, (name, left)
    assert Checked.reserved > 0
