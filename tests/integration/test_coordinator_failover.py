"""Failover under a burst: two coordinator processes (one active, one standby) on the real broker,
2,000 TaskRouted produced straight to Kafka at once, the active SIGKILLed midway. The standby
takes the active role, restores the scheduler table from its changelog, and goes on: every task
reaches one terminal state and the invariants checker (fleetplane.testing.invariants) finds
nothing lost, stuck, duplicated, no overlapping leases and no team above its quota.

The test plays the executors (tests.integration.test_coordinator_admission.Executor)."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import Settings
from fleetplane.infra.broker import free_port
from fleetplane.testing.invariants import check, read_log
from tests.integration.test_coordinator import CoordinatorProcess
from tests.integration.test_coordinator_admission import (
    Executor,
    outcome,
    started,
    terminal_of,
    wait_terminal,
)

TASKS = 2_000
TEAMS_YAML = """
defaults: {{max_running: 10, budget_usd: 1000000}}
teams:
  {p}-pay: {{max_running: 20, weight: 2.0}}
  {p}-search: {{max_running: 30, weight: 1.0}}
  {p}-plat: {{max_running: 40, weight: 1.0}}
"""


def test_burst_with_the_active_sigkilled_fails_over_to_the_standby(
        base_settings: Settings, tmp_path: Path, unique: str) -> None:
    teams = [f"{unique}-pay", f"{unique}-search", f"{unique}-plat"]
    limits = {teams[0]: 20, teams[1]: 30, teams[2]: 40}
    teams_file = tmp_path / "teams-failover.yaml"
    teams_file.write_text(TEAMS_YAML.format(p=unique))
    port = free_port()
    env = {"FLEETPLANE_TEAMS_FILE": str(teams_file),
           "FLEETPLANE_COORDINATOR_WEB_PORT": str(port),
           # the broker is shared with other tests, whose unfinished tasks fill the fleet
           "FLEETPLANE_COORDINATOR_MAX_RUNNING": "1000000",
           "FLEETPLANE_COORDINATOR_TICK_S": "0.5",
           "FLEETPLANE_COORDINATOR_TAKEOVER_S": "3"}
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        proc = CoordinatorProcess(base_settings, tmp_path / name, f"{unique}-{name}", env=env)
        proc.port = port  # one web port: the active one serves it
        procs.append(proc)
    active, standby = procs
    active.start()
    first = active.wait_ready()
    assert first["role"] == "active" and first["instance"] == f"{unique}-a"
    standby.start()
    deadline = time.monotonic() + 30
    while "standby: watching" not in standby.log_tail(100_000):
        assert time.monotonic() < deadline, standby.log_tail()
        time.sleep(0.1)

    def plan(d: ev.TaskDispatched) -> list[tuple[float, ev.Event]]:
        after = 0.05 + random.Random(f"{d.task_id}/{d.attempt}").random() * 0.3
        return [started(d), outcome(d, "ok", after)]

    executor = Executor(base_settings, plan)
    rng = random.Random(12)
    tasks = []
    for i in range(TASKS):
        team = rng.choice(teams)
        spec = ev.TaskSpec(name=f"t{i}", task_type=rng.choice(["summarize", "codegen", "qa"]),
                           prompt="p", priority=rng.choice(["low", "normal", "high"]))
        tasks.append(ev.TaskRouted(task_id=f"{unique}-{i}", team=team, spec=spec, attempt=1,
                                   model="m-standard", provider="anthropic", tier="standard",
                                   reason="burst"))
    ids = {t.task_id for t in tasks}
    producer = EventProducer(base_settings)
    try:
        # acceptance records for the invariants checker (nothing here consumes them)
        producer.send([ev.TaskAccepted(task_id=t.task_id, team=t.team, spec=t.spec)
                       for t in tasks])
        t0 = time.monotonic()
        producer.send(tasks)  # the burst, at Kafka speed
        while len(terminal_of(executor.events())) < TASKS // 2:
            # a guard, not a timing: about 20 s on a quiet machine, minutes at load average 70
            assert time.monotonic() - t0 < 300, "half of the burst not done in 300 s"
            time.sleep(0.05)
        done_at_kill = len(terminal_of(executor.events()))
        active.kill()
        killed_at = time.monotonic()
        seen_before = len(executor.events())
        # failover: the standby takes the role, restores the table, decides again
        stats = None
        while True:
            assert time.monotonic() - killed_at < 60, f"no takeover: {standby.log_tail()}"
            stats = standby.stats()
            if stats and stats.get("ready_s") is not None:
                break
            time.sleep(0.05)
        ready_after = time.monotonic() - killed_at
        while len(executor.events()) == seen_before:
            assert time.monotonic() - killed_at < 60, "nothing decided after the takeover"
            time.sleep(0.02)
        first_output_after = time.monotonic() - killed_at
        wait_terminal(executor, ids, timeout_s=300)
        drained = time.monotonic() - t0
        stats = standby.stats()
        assert stats is not None
    finally:
        executor.close()
        producer.close()
        for proc in reversed(procs):  # the standby first: it would take over from a stopping a
            if proc.proc is not None and proc.proc.poll() is None:
                proc.terminate()

    print(f"\n{TASKS} tasks drained in {drained:.1f}s ({TASKS / drained:.0f} tasks/s); active "
          f"SIGKILLed with {done_at_kill} terminal; standby ready {ready_after:.1f}s after the "
          f"kill (took the role after {stats['standby_s']}s of watching; restore "
          f"{stats['restore_s']}s, {stats['recovered_rows']} rows from "
          f"{stats['changelog_records']} changelog records), first output "
          f"{first_output_after:.1f}s after the kill")
    assert stats["instance"] == f"{unique}-b" and stats["role"] == "active"
    assert stats["recovered_rows"] >= done_at_kill

    log = read_log(base_settings, lambda key: key.startswith(f"{unique}-"))
    verdict = check(log, ids, quota=lambda team: limits.get(team, 10))
    assert verdict.accepted == TASKS
    assert sum(verdict.terminal.values()) == TASKS, verdict.terminal
    assert verdict.terminal == {"TaskCompleted": TASKS}
    assert verdict.ok, verdict.counts()
    assert all(verdict.max_running[t] <= limits[t] for t in teams), verdict.max_running
    # one decision per attempt: nothing dispatched twice across the failover
    dispatched: dict[str, set[str]] = {}
    for e in log.of(ev.TaskDispatched):
        dispatched.setdefault(e.task_id, set()).add(e.event_id)
    assert set(dispatched) == ids
    assert all(len(v) == 1 for v in dispatched.values()), "a task was dispatched twice"


def test_two_standbys_taking_the_role_at_once_leave_one_active(
        base_settings: Settings, tmp_path: Path, unique: str) -> None:
    """The shape of the chaos runs' quota breaches: the active dies and two standbys take the
    role at the same moment (there: both restarted with the broker; here: a planned failover
    asked of both, SIGUSR2). The later claim wins; the other stands down or is fenced before it
    decides anything. Without the claim both decided for seconds: tasks dispatched twice, the
    team above its quota."""
    team, quota, count = f"{unique}-pay", 4, 120
    teams_file = tmp_path / "teams-claims.yaml"
    teams_file.write_text("defaults: {max_running: 10, budget_usd: 1000000}\n"
                          f"teams:\n  {team}: {{max_running: {quota}}}\n")
    port = free_port()
    env = {"FLEETPLANE_TEAMS_FILE": str(teams_file),
           "FLEETPLANE_COORDINATOR_WEB_PORT": str(port),
           "FLEETPLANE_COORDINATOR_MAX_RUNNING": "1000000",
           "FLEETPLANE_COORDINATOR_TICK_S": "0.5",
           "FLEETPLANE_COORDINATOR_TAKEOVER_S": "30"}  # only the failover asked for
    procs = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        proc = CoordinatorProcess(base_settings, tmp_path / name, f"{unique}-{name}", env=env)
        proc.port = port
        procs.append(proc)
    active, b, c = procs
    active.env["FLEETPLANE_COORDINATOR_TAKEOVER_S"] = "1"  # no active yet: takes the role
    active.start()
    active.wait_ready()
    for standby in (b, c):
        standby.start()
    deadline = time.monotonic() + 30
    while not all("standby: watching" in s.log_tail(100_000) for s in (b, c)):
        assert time.monotonic() < deadline, b.log_tail() + c.log_tail()
        time.sleep(0.1)

    def plan(d: ev.TaskDispatched) -> list[tuple[float, ev.Event]]:
        return [started(d), outcome(d, "ok", 0.3 + random.Random(d.task_id).random() * 0.4)]

    executor = Executor(base_settings, plan)
    spec = ev.TaskSpec(name="t", task_type="summarize", prompt="p")
    tasks = [ev.TaskRouted(task_id=f"{unique}-{i}", team=team, spec=spec, attempt=1,
                           model="m-standard", provider="anthropic", tier="standard",
                           reason="claims") for i in range(count)]
    ids = {t.task_id for t in tasks}
    producer = EventProducer(base_settings)
    try:
        producer.send([ev.TaskAccepted(task_id=t.task_id, team=t.team, spec=t.spec)
                       for t in tasks])
        producer.send(tasks)
        t0 = time.monotonic()
        while len(terminal_of(executor.events())) < 12:
            assert time.monotonic() - t0 < 120, active.log_tail()
            time.sleep(0.05)
        active.kill()
        for standby in (b, c):  # both at once
            assert standby.proc is not None
            standby.proc.send_signal(signal.SIGUSR2)
        wait_terminal(executor, ids, timeout_s=300)
        alive = [s for s in (b, c) if s.proc is not None and s.proc.poll() is None]
        exited = [s for s in (b, c) if s not in alive]
    finally:
        executor.close()
        producer.close()
        for proc in procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.terminate()

    log = read_log(base_settings, lambda key: key.startswith(f"{unique}-"))
    verdict = check(log, ids, quota=lambda _team: quota)
    assert verdict.terminal == {"TaskCompleted": count}, verdict.terminal
    assert verdict.max_running[team] <= quota, verdict.quota_breaches
    assert verdict.ok, verdict.counts()
    dispatched: dict[str, set[str]] = {}
    for e in log.of(ev.TaskDispatched):
        dispatched.setdefault(e.task_id, set()).add(e.event_id)
    assert all(len(v) == 1 for v in dispatched.values()), "a task was dispatched twice"
    logs = {s.data_dir.name: s.log_tail(1_000_000) for s in (b, c)}
    assert all("asked to take over" in text for text in logs.values()), logs
    # one of the two holds the role, the other exited for a restart (the supervisor would
    # start it again as a standby)
    assert len(alive) == 1 and len(exited) == 1, logs
    assert exited[0].proc is not None and exited[0].proc.returncode == 75
