"""Several executors (issue 13): two executor processes share tasks.dispatch as one consumer
group behind a real coordinator process; one is SIGKILLed mid-attempt and restarted (a pod
restarted with its identity: the embedded broker never expires a killed static member, so its
partitions wait for it). Every task reaches exactly one terminal state, no attempt's effect
happens twice (fleetplane.testing.invariants: invariants 1 and 2), and the fake provider's call
log shows no attempt billed twice."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import Settings
from fleetplane.core.topics import LIFECYCLE, OUTCOMES
from fleetplane.fakeprovider import FakeProvider
from fleetplane.testing.invariants import check, read_log
from tests.integration.test_coordinator import CoordinatorProcess
from tests.integration.test_executor_process import ExecutorProcess, Reader, wait_group_assigned

from .agentkit import sample_repo

TASKS = 12


def test_sigkill_mid_attempt_with_two_executors_keeps_invariants_1_and_2(
        base_settings: Settings, tmp_path: Path, unique: str) -> None:
    with FakeProvider() as fake:
        run(base_settings, tmp_path, unique, fake)


def run(base_settings: Settings, tmp_path: Path, unique: str, fake: FakeProvider) -> None:
    fake.set_script({"replies": [
        {"match": "FLEET", "text": "done", "latency_ms": 4_000, "times": None}]})
    coordinator = CoordinatorProcess(base_settings, tmp_path, f"coord-{unique}",
                                     env={"FLEETPLANE_COORDINATOR_TICK_S": "0.5"})
    repo = sample_repo(tmp_path)
    executors = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        proc = ExecutorProcess(base_settings, tmp_path / name, repo, fake, unique)
        proc.env.update({"FLEETPLANE_EXECUTOR_ID": f"exec-{name}-{unique}",
                         "FLEETPLANE_INSTANCE_ID": f"exec-{name}-{unique}",
                         "FLEETPLANE_EXECUTOR_SLOTS": "3",
                         "FLEETPLANE_EXECUTOR_HEARTBEAT_S": "1",
                         # librdkafka's group state machine in the log: a failure to form the
                         # group says which member is where (wait_group_assigned's message)
                         "FLEETPLANE_KAFKA_CONSUMER_CONFIG": json.dumps({"debug": "cgrp"})})
        executors.append(proc)
    a, b = executors
    b.skip_history = lambda: None  # type: ignore[method-assign]  # a set the group's start
    ids = [f"{unique}-fleet-{i}" for i in range(TASKS)]
    lifecycle = Reader(base_settings, LIFECYCLE)
    outcomes = Reader(base_settings, OUTCOMES)
    producer = EventProducer(base_settings)
    try:
        coordinator.start()
        coordinator.wait_ready()
        a.start()
        b.start()
        a.wait_log("parallel processor started")
        b.wait_log("parallel processor started")
        # both in the group with partitions before any dispatch: the first to join takes every
        # partition until the second's join splits them, and a late join (a loaded machine)
        # left the first one running all the tasks while the second never started one
        wait_group_assigned(base_settings, a.env["FLEETPLANE_EXECUTOR_GROUP_ID"], members=2,
                            procs=executors)
        tasks = []
        for t in ids:
            spec = ev.TaskSpec(name=t, task_type="codegen", prompt=f"FLEET {t}")
            tasks.append((ev.TaskAccepted(task_id=t, team="payments", spec=spec),
                          ev.TaskRouted(task_id=t, team="payments", spec=spec, attempt=1,
                                        model="claude-haiku-4-5", provider="anthropic",
                                        tier="small", reason="test")))
        producer.send([acc for acc, _ in tasks])
        producer.send([routed for _, routed in tasks])

        def started_by(executor_id: str, seen: list[ev.Event]) -> set[tuple[str, int]]:
            return {(e.task_id, e.attempt) for e in seen if isinstance(e, ev.TaskStarted)
                    and e.executor_id == executor_id and e.task_id in ids}

        # a is killed while attempts it claimed are waiting on their model call
        seen = lifecycle.until(lambda s: bool(started_by(a.env["FLEETPLANE_EXECUTOR_ID"], s))
                               and bool(started_by(b.env["FLEETPLANE_EXECUTOR_ID"], s)),
                               timeout_s=120)
        time.sleep(0.5)
        ended = {(e.task_id, e.attempt) for e in outcomes.until(lambda s: True, timeout_s=0.1)
                 if isinstance(e, (ev.TaskCompleted, ev.TaskFailed))}
        in_flight = started_by(a.env["FLEETPLANE_EXECUTOR_ID"], seen) - ended
        a.kill()
        assert in_flight, "a finished its attempts before the kill: nothing was mid-attempt"
        a.start()
        a.wait_log("parallel processor started")

        def all_terminal(s: list[ev.Event]) -> bool:
            return {e.task_id for e in s if ev.is_terminal(e)} >= set(ids)

        outcomes.until(all_terminal, timeout_s=240)
    finally:
        for proc in executors:
            proc.stop()
        if coordinator.proc is not None:
            coordinator.terminate()
        lifecycle.close()
        outcomes.close()
        producer.close()

    log = read_log(base_settings, lambda key: key in set(ids))
    verdict = check(log, set(ids), quota=lambda team: 1_000_000)
    # invariant 1: every accepted task reached exactly one terminal state
    assert verdict.accepted == TASKS
    assert not verdict.lost and not verdict.stuck and not verdict.duplicated, verdict.counts()
    assert sum(verdict.terminal.values()) == TASKS, verdict.terminal
    # invariant 2: no attempt's effect twice (a model call index recorded twice, a commit twice)
    assert not verdict.double_effects, verdict.double_effects
    # ... and the provider billed no attempt twice: one model call per attempt here (a text
    # answer ends the attempt), so a task's calls are at most its attempts that started
    attempts: dict[str, set[int]] = defaultdict(set)
    for e in log.of(ev.TaskStarted):
        attempts[e.task_id].add(e.attempt)  # type: ignore[attr-defined]
    calls = Counter(c.last_user_text.split(" ", 1)[1] for c in fake.calls
                    if c.last_user_text.startswith("FLEET ") and
                    c.last_user_text.split(" ", 1)[1] in set(ids))
    billed_twice = {t: (n, sorted(attempts[t])) for t, n in calls.items()
                    if n > len(attempts[t])}
    assert not billed_twice, billed_twice
    # the attempts a was running when it died were not started again by its restart (a re-run
    # would publish its TaskStarted, same event id, a second time)
    for task, attempt in in_flight:
        redone = [e for topic, e in log.records if topic == LIFECYCLE
                  and isinstance(e, ev.TaskStarted) and e.task_id == task
                  and e.attempt == attempt]
        assert len(redone) == 1, redone
