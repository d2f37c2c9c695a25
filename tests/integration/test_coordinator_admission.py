"""Admission end to end on the real broker, checked from the event log: the coordinator as a
subprocess; this test plays the router (TaskRouted, and the next TaskRouted after a
TaskEscalated) and the executors (TaskStarted, heartbeats, outcomes, TaskRolledBack), by
publishing their events.

Invariants 3, 4, 5 under 300 tasks from 3 teams on 2 repositories with overlapping write scopes
and random failures; a dependency chain; retry then success; escalation; rollback; lost
executor."""

from __future__ import annotations

import heapq
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from fleetplane.coordinator.globs import scope_overlap
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import DISPATCH, LIFECYCLE, OUTCOMES
from tests.integration.test_coordinator import CoordinatorProcess

TEAMS_YAML = """
defaults: {{max_running: 4, budget_usd: 1000}}
teams:
  {p}-pay: {{max_running: 3, weight: 2.0}}
  {p}-search: {{max_running: 4, weight: 1.0}}
  {p}-plat: {{max_running: 5, weight: 1.0}}
"""
# The fleet capacity is global, and the broker (one per test session) keeps the scheduler table
# of earlier tests, whose tasks never ended: capacity is checked in the unit tests; here the
# teams (unique per test) are the limit.
FLEET_CAPACITY = 1_000_000
SCOPES = ["src/**", "src/a/*.py", "src/a/x.py", "src/b/**", "docs/**", "docs/*.md",
          "**/*.md", "tests/test_[a-m]*.py", "tests/test_[n-z]*.py", "lib/?.py"]


class Tail:
    """Every record of some topics from their end at creation (read_committed)."""

    def __init__(self, settings: Settings, topics: list[str]) -> None:
        self.consumer = Consumer({**settings.consumer_config(f"tail-{uuid.uuid4().hex}"),
                                  "enable.auto.commit": False})
        tps = []
        for topic in topics:
            meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
            for p in meta.partitions:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                              timeout=10)
                tps.append(TopicPartition(topic, p, high))
        self.consumer.assign(tps)
        self.serde = default_serde()

    def poll(self, timeout: float = 0.05) -> list[ev.Event]:
        out = []
        for m in self.consumer.consume(500, timeout):
            if m.error() is None:
                out.append(self.serde.decode(m.value() or b""))
        return out

    def close(self) -> None:
        self.consumer.close()


@dataclass
class Executor:
    """Plays the executors: reacts to each TaskDispatched with the events `plan` returns
    (delay in seconds, event), publishing them when due. Also the router for escalations."""

    settings: Settings
    plan: Callable[[ev.TaskDispatched], list[tuple[float, ev.Event]]]
    log: list[ev.Event] = field(default_factory=list)  # everything seen and sent, in order
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.tail = Tail(self.settings, [DISPATCH, LIFECYCLE, OUTCOMES])
        self.producer = EventProducer(self.settings)
        self.stop = threading.Event()
        self.due: list[tuple[float, int, ev.Event]] = []
        self.n = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for e in self.tail.poll(0.02):
                with self.lock:
                    self.log.append(e)
                reactions: list[tuple[float, ev.Event]] = []
                if isinstance(e, ev.TaskDispatched):
                    if e.action == "rollback":
                        reactions = [(0.05, ev.TaskRolledBack(
                            task_id=e.task_id, team=e.team, attempt=e.attempt,
                            reason="reverted", files=["x"]))]
                    else:
                        reactions = self.plan(e)
                elif isinstance(e, ev.TaskEscalated) and e.spec is not None:  # the router
                    reactions = [(0.01, ev.TaskRouted(
                        task_id=e.task_id, team=e.team, spec=e.spec, attempt=e.attempt,
                        model=f"model-{e.to_tier}", provider="anthropic", tier=e.to_tier,
                        reason=f"escalated from {e.from_tier}"))]
                now = time.monotonic()
                for delay, out in reactions:
                    self.n += 1
                    heapq.heappush(self.due, (now + delay, self.n, out))
            now = time.monotonic()
            batch = []
            while self.due and self.due[0][0] <= now:
                batch.append(heapq.heappop(self.due)[2])
            if batch:
                stamped = [b.model_copy(update={"occurred_at": ev.utcnow_ms()}) for b in batch]
                self.producer.send(stamped)

    def events(self) -> list[ev.Event]:
        with self.lock:
            return list(self.log)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.tail.close()
        self.producer.close()


def outcome(d: ev.TaskDispatched, kind: str, after: float) -> tuple[float, ev.Event]:
    if kind == "ok":
        return after, ev.TaskCompleted(task_id=d.task_id, team=d.team, attempt=d.attempt,
                                       model=d.model, output=f"out-{d.task_id}", cost_usd=0.01,
                                       duration_ms=int(after * 1000))
    return after, ev.TaskFailed(task_id=d.task_id, team=d.team, attempt=d.attempt,
                                failure_class=kind, reason="injected", cost_usd=0.01)


def started(d: ev.TaskDispatched) -> tuple[float, ev.Event]:
    return 0.01, ev.TaskStarted(task_id=d.task_id, team=d.team, attempt=d.attempt,
                                executor_id="sim")


@pytest.fixture
def coordinator(base_settings: Settings, tmp_path: Path, unique: str
                ) -> Iterator[CoordinatorProcess]:
    teams = tmp_path / "teams-admission.yaml"
    teams.write_text(TEAMS_YAML.format(p=unique))
    proc = CoordinatorProcess(base_settings, tmp_path, instance_id=f"adm-{unique}", env={
        "FLEETPLANE_TEAMS_FILE": str(teams),
        "FLEETPLANE_COORDINATOR_MAX_RUNNING": str(FLEET_CAPACITY),
        "FLEETPLANE_COORDINATOR_HEARTBEAT_TIMEOUT_S": "2",
        "FLEETPLANE_COORDINATOR_TICK_S": "0.2",
        "FLEETPLANE_COORDINATOR_BACKOFF_BASE_MS": "100",
        "FLEETPLANE_COORDINATOR_BACKOFF_CAP_MS": "400",
    })
    proc.start()
    proc.wait_ready()
    yield proc
    proc.terminate()


def routed(task_id: str, team: str, repo: str, scope: list[str], **spec: Any) -> ev.TaskRouted:
    s = ev.TaskSpec(name=task_id, task_type="refactor", prompt="p", repository=repo,
                    write_scope=scope, **spec)
    return ev.TaskRouted(task_id=task_id, team=team, spec=s, attempt=1, model="m-standard",
                         provider="anthropic", tier="standard", reason="test")


def wait_terminal(executor: Executor, ids: set[str], timeout_s: float) -> dict[str, ev.Event]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ends = terminal_of(executor.events())
        if ids <= set(ends):
            return ends
        time.sleep(0.2)
    log = executor.events()
    ends = terminal_of(log)
    counts: dict[str, int] = {}
    for e in log:
        if e.task_id in ids:
            counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1
    raise AssertionError(f"{len(ids - set(ends))} of {len(ids)} tasks never ended: "
                         f"{sorted(ids - set(ends))[:5]}; events seen: {counts}")


def terminal_of(log: list[ev.Event]) -> dict[str, ev.Event]:
    ends: dict[str, ev.Event] = {}
    for e in log:
        if ev.is_terminal(e):
            ends.setdefault(e.task_id, e)
    return ends


def attempt_intervals(log: list[ev.Event]) -> list[tuple[datetime, datetime, ev.TaskDispatched]]:
    """Each dispatched run attempt from its TaskDispatched to the event that ended it (its
    outcome, the coordinator's lost-executor failure, a cancel) or the rollback's end."""
    ends: dict[tuple[str, int], datetime] = {}
    for e in log:
        att = getattr(e, "attempt", None)
        if isinstance(e, ev.TaskCompleted | ev.TaskRolledBack | ev.TaskAbandoned) or (
                isinstance(e, ev.TaskFailed) and not e.final):
            key = (e.task_id, att or 0)
            if isinstance(e, ev.TaskRolledBack) or key not in ends:
                ends[key] = e.occurred_at  # a rollback holds the lease until it is done
    out = []
    for e in log:
        if isinstance(e, ev.TaskDispatched) and e.action == "run":
            end = ends.get((e.task_id, e.attempt))
            assert end is not None, f"attempt {e.task_id}/{e.attempt} never ended"
            out.append((e.occurred_at, end, e))
    return out


def test_300_tasks_invariants_3_4_5(coordinator: CoordinatorProcess, base_settings: Settings,
                                    unique: str) -> None:
    rng = random.Random(7)
    teams = [f"{unique}-pay", f"{unique}-search", f"{unique}-plat"]
    limits = {teams[0]: 3, teams[1]: 4, teams[2]: 5}
    repos = [f"{unique}-r1", f"{unique}-r2"]
    stuck = f"{unique}-stuck"

    def plan(d: ev.TaskDispatched) -> list[tuple[float, ev.Event]]:
        if d.task_id == stuck:  # heartbeats, and holds src/** in r1 until the test ends it
            return [started(d), *[(0.5 * k, ev.TaskHeartbeat(
                task_id=d.task_id, team=d.team, attempt=d.attempt, executor_id="sim"))
                for k in range(1, 240)]]
        r = random.Random(f"{d.task_id}/{d.attempt}").random()
        after = 0.05 + r * 0.25
        if r < 0.04:  # an executor that dies after starting: no heartbeat, no outcome
            return [started(d)]
        if r < 0.20:
            return [started(d), outcome(d, "model_error", after)]
        return [started(d), outcome(d, "ok", after)]

    executor = Executor(base_settings, plan)
    try:
        tasks = [routed(stuck, teams[0], repos[0], ["src/**"])]
        for i in range(300):
            scope = rng.sample(SCOPES, rng.choice([1, 1, 2]))
            tasks.append(routed(f"{unique}-{i}", rng.choice(teams), rng.choice(repos), scope,
                                failure_policy=rng.choice(["retry", "retry", "abandon"]),
                                priority=rng.choice(["low", "normal", "high"])))
        executor.producer.send(tasks[:1])
        time.sleep(1.0)
        t0 = time.monotonic()
        executor.producer.send(tasks[1:])
        # invariant 5: everything unrelated to the stuck lease (the other repository, or no
        # overlap with src/**) ends while it is held; if held work blocked it, this times out
        unrelated = [t for t in tasks[1:] if t.spec.repository == repos[1]
                     or not scope_overlap(t.spec.write_scope, ["src/**"])]
        wait_terminal(executor, {t.task_id for t in unrelated}, timeout_s=180)
        assert stuck not in terminal_of(executor.events())
        stuck_d = next(e for e in executor.events() if isinstance(e, ev.TaskDispatched)
                       and e.task_id == stuck)
        executor.producer.send([outcome(stuck_d, "ok", 0)[1]])
        ends = wait_terminal(executor, {t.task_id for t in tasks}, timeout_s=180)
        print(f"\n301 tasks, all terminal in {time.monotonic() - t0:.1f}s")
        log = executor.events()
    finally:
        executor.close()

    # exactly one terminal outcome per task (from the log; a re-published record keeps its
    # event id, which consumers deduplicate)
    terminal_ids: dict[str, set[str]] = {}
    for e in log:
        if ev.is_terminal(e):
            terminal_ids.setdefault(e.task_id, set()).add(e.event_id)
    twice = {t: ids for t, ids in terminal_ids.items() if len(ids) > 1}
    assert not twice, f"tasks ended twice: {list(twice.items())[:3]}"

    intervals = attempt_intervals([e for e in log if e.task_id.startswith(unique)])
    spec_of = {t.task_id: t.spec for t in tasks}
    # invariant 3: no two attempts with overlapping write scopes in one repository overlap
    clashes = []
    for i, (s1, e1, d1) in enumerate(intervals):
        for s2, e2, d2 in intervals[i + 1:]:
            if d1.task_id == d2.task_id or spec_of[d1.task_id].repository != \
                    spec_of[d2.task_id].repository:
                continue
            if s1 < e2 and s2 < e1 and scope_overlap(d1.leased_paths, d2.leased_paths):
                clashes.append((d1.task_id, d2.task_id))
    assert not clashes, f"overlapping leases ran together: {clashes[:5]}"

    # invariant 4: a team's running attempts never exceed its quota; the fleet its capacity
    points = sorted([(s, 1, d.team) for s, _, d in intervals]
                    + [(e, -1, d.team) for _, e, d in intervals], key=lambda p: (p[0], p[1]))
    running: dict[str, int] = dict.fromkeys(teams, 0)
    peak = dict(running)
    fleet_peak = 0
    for _, delta, team in points:
        running[team] += delta
        peak[team] = max(peak[team], running[team])
        fleet_peak = max(fleet_peak, sum(running.values()))
    print(f"peak running per team {peak} (limits {limits}), all teams {fleet_peak}")
    assert all(peak[t] <= limits[t] for t in teams)
    assert any(peak[t] == limits[t] for t in teams)  # the quotas were actually reached

    # invariant 5 (continued): the related tasks waited for the stuck lease, the others did not
    stuck_start, stuck_end, _ = next(x for x in intervals if x[2].task_id == stuck)
    related = [t for t in tasks[1:] if t not in unrelated]
    first_dispatch: dict[str, datetime] = {}
    for s, _, d in intervals:
        first_dispatch.setdefault(d.task_id, s)
    blocked = [t.task_id for t in related if t.task_id in first_dispatch
               and first_dispatch[t.task_id] < stuck_end]
    assert not blocked, f"tasks overlapping the stuck lease ran during it: {blocked[:5]}"
    assert all(ends[t.task_id].occurred_at <= stuck_end for t in unrelated)
    print(f"while src/** in r1 was leased ({(stuck_end - stuck_start).total_seconds():.1f}s): "
          f"all {len(unrelated)} unrelated tasks ended, {len(related)} related tasks waited")
    holds = [e for e in log if isinstance(e, ev.TaskHeld) and e.task_id.startswith(unique)]
    conflict_by_stuck = [h for h in holds if h.kind == "conflict" and h.held_by == stuck]
    assert conflict_by_stuck and all(h.paths == ["src/**"] for h in conflict_by_stuck)
    assert {h.kind for h in holds} >= {"conflict", "quota", "backoff"}
    # random failures were handled by their policies (and lost executors were detected)
    lost = [e for e in log if isinstance(e, ev.TaskFailed) and e.failure_class == "lost_executor"]
    assert lost, "no lost executor was detected"
    kinds = {type(e).__name__ for e in ends.values()}
    assert {"TaskCompleted", "TaskAbandoned"} <= kinds


def test_chain_retry_escalation_rollback(coordinator: CoordinatorProcess,
                                         base_settings: Settings, unique: str) -> None:
    team, repo = f"{unique}-plat", f"{unique}-r1"
    ids = {k: f"{unique}-{k}" for k in ("a", "b", "c", "retry", "esc", "rb")}

    def plan(d: ev.TaskDispatched) -> list[tuple[float, ev.Event]]:
        if d.task_id == ids["retry"] and d.attempt == 1:
            return [started(d), outcome(d, "tool_error", 0.05)]
        if d.task_id == ids["esc"] and d.tier != "frontier":
            return [started(d), outcome(d, "model_error", 0.05)]
        if d.task_id == ids["rb"]:
            return [started(d), outcome(d, "timeout", 0.05)]
        return [started(d), outcome(d, "ok", 0.1)]

    executor = Executor(base_settings, plan)
    try:
        executor.producer.send([
            routed(ids["c"], team, repo, ["c/**"], depends_on=[ids["b"]]),
            routed(ids["b"], team, repo, ["b/**"], depends_on=[ids["a"]]),
            routed(ids["a"], team, repo, ["a/**"]),
            routed(ids["retry"], team, repo, ["r/**"]),
            routed(ids["esc"], team, repo, ["e/**"], failure_policy="escalate"),
            routed(ids["rb"], team, repo, ["x/**"], failure_policies={"timeout": "rollback"}),
        ])
        ends = wait_terminal(executor, set(ids.values()), timeout_s=60)
        log = executor.events()
    finally:
        executor.close()
    dispatches = [e for e in log if isinstance(e, ev.TaskDispatched)]
    order = [d.task_id for d in dispatches if d.task_id in (ids["a"], ids["b"], ids["c"])]
    assert order == [ids["a"], ids["b"], ids["c"]]
    done_at = {e.task_id: e.occurred_at for e in log if isinstance(e, ev.TaskCompleted)}
    by_id = {d.task_id: d for d in dispatches}
    assert by_id[ids["b"]].occurred_at >= done_at[ids["a"]]
    assert by_id[ids["c"]].inputs == {ids["b"]: f"out-{ids['b']}"}
    assert isinstance(ends[ids["c"]], ev.TaskCompleted)
    # retry then success, after the backoff
    retry = [e for e in log if e.task_id == ids["retry"]]
    assert [type(e).__name__ for e in retry if isinstance(
        e, ev.TaskRetrying | ev.TaskCompleted)] == ["TaskRetrying", "TaskCompleted"]
    assert [d.attempt for d in dispatches if d.task_id == ids["retry"]] == [1, 2]
    # escalation to a higher tier: standard -> frontier, then success
    esc = next(e for e in log if isinstance(e, ev.TaskEscalated) and e.task_id == ids["esc"])
    assert (esc.from_tier, esc.to_tier, esc.attempt) == ("standard", "frontier", 2)
    assert [d.tier for d in dispatches if d.task_id == ids["esc"]] == ["standard", "frontier"]
    assert isinstance(ends[ids["esc"]], ev.TaskCompleted)
    # rollback: a rollback job dispatched, the task ends rolled back
    assert [d.action for d in dispatches if d.task_id == ids["rb"]] == ["run", "rollback"]
    assert isinstance(ends[ids["rb"]], ev.TaskRolledBack)


def test_cli_pause_get_held_resume_approve(coordinator: CoordinatorProcess,
                                           base_settings: Settings, unique: str) -> None:
    """The operator's commands through the real CLI: pause a team, see its task held with the
    reason (`get held`, from the coordinator's page), resume; approve a task held for
    approval after a failure."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "FLEETPLANE_KAFKA_BOOTSTRAP": base_settings.kafka_bootstrap,
           "FLEETPLANE_COORDINATOR_WEB_PORT": str(coordinator.port),
           "FLEETPLANE_DATA_DIR": str(coordinator.data_dir / "cli")}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "fleetplane.cli.main", *args], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    team, repo = f"{unique}-plat", f"{unique}-r1"
    first_try: set[str] = set()

    def plan(d: ev.TaskDispatched) -> list[tuple[float, ev.Event]]:
        if d.task_id.endswith("-appr") and d.task_id not in first_try:
            first_try.add(d.task_id)
            return [started(d), outcome(d, "tool_error", 0.05)]
        return [started(d), outcome(d, "ok", 0.05)]

    executor = Executor(base_settings, plan)
    try:
        cli("pause", "--team", team, "--reason", "maintenance")
        paused, appr = f"{unique}-paused", f"{unique}-appr"
        executor.producer.send([routed(paused, team, repo, ["p/**"]),
                                routed(appr, f"{unique}-search", repo, ["q/**"],
                                       failure_policies={"tool_error": "hold"})])
        deadline = time.monotonic() + 60
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = json.loads(cli("get", "held", "--json"))
            kinds = {r["task_id"]: r["kind"] for r in rows}
            if kinds.get(paused) == "paused" and kinds.get(appr) == "approval":
                break
            time.sleep(0.5)
        held = {r["task_id"]: r for r in rows}
        assert held[paused]["kind"] == "paused" and "maintenance" in held[paused]["reason"]
        assert held[appr]["kind"] == "approval" and "tool_error" in held[appr]["reason"]
        cli("resume", "--team", team)
        cli("approve", appr)
        ends = wait_terminal(executor, {paused, appr}, timeout_s=60)
    finally:
        executor.close()
    assert isinstance(ends[paused], ev.TaskCompleted)
    assert isinstance(ends[appr], ev.TaskCompleted) and ends[appr].attempt == 2
