"""Replay equivalence: the incremental admission makes the same decisions as the full pass it
replaced (tests/unit/coordinator_oracle.py) on recorded event logs: the same events (ids
included) for every input event, in the same order per task, and the same table rows after."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from fleetplane.coordinator.scheduler import AdmissionPolicy, Scheduler
from fleetplane.coordinator.world import World
from fleetplane.core import events as ev
from fleetplane.core.catalog import Catalog
from tests.unit.coordinator_logs import Workload, simulate, teams_config
from tests.unit.coordinator_oracle import FullPassScheduler

CATALOG = Catalog(tiers=["small", "standard", "frontier"], default_tier="standard", models={})

WORKLOADS = {
    # the integration test's 301 tasks: 3 teams, 2 repositories, src/** leased by a stuck task
    "invariants-301": (Workload(tasks=300, stuck=True, operators=False, p_dependency=0.0), 7),
    "operators": (Workload(tasks=400, p_never_start=0.03), 11),
    "many-teams": (Workload(tasks=600, repositories=5, capacity=20, burst=200, teams={
        f"team{i}": {"max_running": 2 + i % 4, "weight": 1.0 + i % 3} for i in range(8)}), 3),
    "fleet-bound": (Workload(tasks=400, capacity=3, p_never_start=0.0, burst=400), 5),
}


def policy(w: Workload) -> AdmissionPolicy:
    return AdmissionPolicy(teams=teams_config(w), catalog=CATALOG, max_running=w.capacity,
                           heartbeat_timeout_ms=5_000, backoff_base_ms=500,
                           start_timeout_ms=20_000, conflict_hold_timeout_ms=30_000,
                           reservations=False)  # the oracle's decisions predate them


def canon(events: list[ev.Event]) -> tuple[list[str], dict[str, list[str]]]:
    """All events (as JSON, sorted) and each task's events in their order."""
    dumped = [json.dumps(e.model_dump(mode="json"), sort_keys=True) for e in events]
    per_task: dict[str, list[str]] = defaultdict(list)
    for e, d in zip(events, dumped, strict=True):
        per_task[e.task_id].append(d)
    return sorted(dumped), dict(per_task)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_incremental_admission_decides_as_the_full_pass(name: str) -> None:
    w, seed = WORKLOADS[name]
    oracle = FullPassScheduler(policy(w))
    log = simulate(oracle, w, seed)
    # the log is realistic: it exercises every kind of hold and most outcomes
    assert len(log) > w.tasks * 3
    old_world, new_world = World(), World()
    old, new = FullPassScheduler(policy(w)), Scheduler(policy(w))
    kinds: set[str] = set()
    outcomes: set[str] = set()
    for i, event in enumerate(log):
        want = old.apply(old_world, event)
        got = new.apply(new_world, event)
        assert canon(got) == canon(want), f"event {i} ({type(event).__name__} " \
            f"{event.task_id}) decided differently"
        if i % 25 == 0:  # the queues hold exactly the queued tasks' ranks (World._index
            # re-uses a re-indexed task's entry in place)
            for team, queue in new_world.queues.items():
                assert queue == sorted(k for t, k, _ in new_world._queued.values() if t == team)
        kinds |= {e.kind for e in want if isinstance(e, ev.TaskHeld)}
        outcomes |= {type(e).__name__ for e in want}
    assert {t: r.model_dump() for t, r in new_world.tasks.items()} == \
        {t: r.model_dump() for t, r in old_world.tasks.items()}
    assert new_world.fleet == old_world.fleet
    assert {"quota", "conflict"} <= kinds
    assert {"TaskDispatched", "TaskRetrying"} <= outcomes
    if w.operators:
        assert {"paused", "kill_switch", "backoff"} <= kinds
    if w.stuck:
        assert "stuck" in old_world.tasks and old_world.tasks["stuck"].terminal


def test_replay_from_a_reloaded_table_decides_the_same() -> None:
    """Restored from its rows mid-log (a failover), the scheduler goes on deciding as the one
    that never stopped: the indexes admission needs are rebuilt from the rows."""
    w, seed = WORKLOADS["operators"]
    log = simulate(FullPassScheduler(policy(w)), w, seed)
    world, scheduler = World(), Scheduler(policy(w))
    half = len(log) // 2
    for event in log[:half]:
        scheduler.apply(world, event)
    rows = [(k, v) for k, v in world.take_rows()]
    restored = World.load(rows)
    oracle_world = World.load(rows)
    oracle = FullPassScheduler(policy(w))
    for event in log[half:]:
        assert canon(scheduler.apply(restored, event)) == canon(oracle.apply(oracle_world, event))


class _Forgetful(dict[str, object]):
    """A memo that never remembers: every conflict is computed from the leases."""

    def __setitem__(self, key: str, value: object) -> None:
        pass


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_the_clear_verdict_memo_changes_no_decision(name: str) -> None:
    """Scheduler._conflict remembers rows it found clear until a lease is taken in their
    repository; the oracle has the memo too, so it is checked here against no memo at all
    (with reservations on, as in the service)."""
    w, seed = WORKLOADS[name]
    log = simulate(FullPassScheduler(policy(w)), w, seed)
    on = AdmissionPolicy(**{**policy(w).__dict__, "reservations": True})
    plain, memo = Scheduler(on), Scheduler(on)
    plain._clear = _Forgetful()  # type: ignore[assignment]
    plain_world, memo_world = World(), World()
    for i, event in enumerate(log):
        assert canon(memo.apply(memo_world, event)) == canon(plain.apply(plain_world, event)), \
            f"event {i} decided differently"
    assert memo._clear, "the memo was never used"


@pytest.mark.parametrize("apart", [True, False], ids=["spec-apart", "spec-inline"])
def test_the_table_written_once_per_batch_reloads_as_the_world(
        apart: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator writes the rows a transaction changed once, at its commit (last value
    per key); a large spec goes into a ``spec/`` record written once (dropped with the spec
    when the task ends), its rows written without it. A world loaded from that table (a
    failover's restore) must be the live world, row for row, at every commit, and decide the
    rest of the log as the live one does."""
    import random

    from fleetplane.coordinator import world as world_module
    monkeypatch.setattr(world_module, "SPEC_APART_BYTES", 0 if apart else 10**9)
    w, seed = WORKLOADS["operators"]
    log = simulate(FullPassScheduler(policy(w)), w, seed)
    world, scheduler = World(), Scheduler(policy(w))
    table: dict[bytes, bytes] = {}
    rng = random.Random(5)
    spec_writes, row_writes, routes, i, checked, batches = 0, 0, 0, 0, 0, 0
    while i < len(log) * 2 // 3:
        batches += 1
        for event in log[i:i + rng.randint(1, 60)]:  # one transaction's records
            scheduler.apply(world, event)
            routes += isinstance(event, ev.TaskRouted)
            i += 1
        for key, value in world.take_rows():
            spec_writes += key.startswith(b"spec/") and value is not None
            row_writes += key.startswith(b"task/")
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        if batches % 5 == 0:
            restored = World.load(table.items())
            assert {t: r.model_dump() for t, r in restored.tasks.items()} == \
                {t: r.model_dump() for t, r in world.tasks.items()}
            assert restored.fleet == world.fleet
            checked += 1
    assert checked >= 8
    inline = [k for k, v in table.items() if k.startswith(b"task/") and b'"spec"' in v]
    if apart:  # the spec travels once per task (and again only when a new route changes it)
        assert 0 < spec_writes <= routes and spec_writes < row_writes / 2 and not inline
        ended = [t for t, r in world.tasks.items() if r.terminal]
        assert ended and not any(f"spec/{t}".encode() in table for t in ended)
    else:
        assert spec_writes == 0 and inline
    restored, other = World.load(table.items()), Scheduler(policy(w))
    for event in log[i:]:
        assert canon(other.apply(restored, event)) == canon(scheduler.apply(world, event))


def test_a_row_of_the_former_layout_with_its_spec_inline_still_loads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables written before the spec/ records hold every spec inside the task/ row."""
    from fleetplane.coordinator import world as world_module
    w, seed = WORKLOADS["operators"]
    log = simulate(FullPassScheduler(policy(w)), w, seed)
    world, scheduler = World(), Scheduler(policy(w))
    for event in log[: len(log) // 2]:
        scheduler.apply(world, event)
    former = [(b"task/" + t.encode(), r.to_bytes()) for t, r in world.tasks.items()]
    restored = World.load([*former, (b"fleet", world.fleet.to_bytes())])
    assert {t: r.model_dump() for t, r in restored.tasks.items()} == \
        {t: r.model_dump() for t, r in world.tasks.items()}
    # the next write of such a task moves a large spec into a spec/ record
    monkeypatch.setattr(world_module, "SPEC_APART_BYTES", 0)
    queued = next(t for t, r in restored.tasks.items() if r.spec is not None)
    restored.put(restored.tasks[queued])
    keys = dict(restored.take_rows())
    assert json.loads(keys[b"spec/" + queued.encode()]) == json.loads(
        restored.tasks[queued].spec.model_dump_json(exclude_defaults=True))  # type: ignore[union-attr]


def test_the_events_the_repartition_drops_change_nothing() -> None:
    """The repartition step does not copy the coordinator's own TaskHeld, TaskRetrying,
    TaskEscalated and TaskConflict (read back from tasks.lifecycle) to the scheduler topic:
    fed back to the scheduler at any point of a log, each must decide nothing and change no
    row; the inputs that do decide are still copied."""
    from fleetplane.coordinator.scheduler import changes_nothing

    w, seed = WORKLOADS["operators"]
    log = simulate(FullPassScheduler(policy(w)), w, seed)
    world, scheduler = World(), Scheduler(policy(w))
    echoes: set[str] = set()
    for event in log:
        assert not changes_nothing(event), type(event).__name__  # every input is copied
        decided = scheduler.apply(world, event)
        world.take_rows()
        for out in decided:
            if not changes_nothing(out):
                continue
            echoes.add(type(out).__name__)
            row, fleet = world.tasks.get(out.task_id), world.fleet
            assert scheduler.apply(world, out) == []
            assert world.take_rows() == []
            assert world.tasks.get(out.task_id) is row and world.fleet is fleet
    assert {"TaskHeld", "TaskRetrying", "TaskEscalated", "TaskConflict"} <= echoes
    assert not changes_nothing(ev.TaskFailed(task_id="t", team="a", attempt=1, reason="x",
                                             failure_class="lost_executor", final=True))
