"""The `burst` scenario of `make bench` (issue 12): N TaskSubmitted records produced at Kafka
speed onto tasks.submitted (3 teams, mixed task types, no repository), through all five
services; every task must reach a terminal state and `fleetplane.testing.invariants` must find
nothing. Figures: drain time (first submit -> last terminal), tasks/s, the coordinators' CPU-s,
restarts of the coordinator. The same again with the active coordinator SIGKILLed when half of
the tasks are terminal: the failover time is the time from the kill to the first dispatch
decided by the standby (and the standby's own figures: restore, state rebuild).

    python -m bench.burst [--tasks 20000] [--no-kill] [--kill-only]
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import httpx
from rich.console import Console

from bench.pipeline import cpu_now, start_stack, submit_kafka, warm_up
from bench.recorder import StageRecorder
from fleetplane.cli.stack import COORDINATOR_STANDBY, Stack
from fleetplane.core.teams import load_teams
from fleetplane.testing.invariants import check, read_log

COORDINATORS = ("coordinator", COORDINATOR_STANDBY)


def coordinator_stats(stack: Stack) -> dict[str, Any]:
    try:
        data: dict[str, Any] = httpx.get(f"http://127.0.0.1:{stack.coordinator_web_port}"
                                         "/coordinator/stats/", timeout=2.0).json()
        return data
    except (httpx.HTTPError, ValueError):
        return {}


def run(stack: Stack, recorder: StageRecorder, n: int, kill: bool,
        timeout_s: float) -> dict[str, Any]:
    run_id = f"burst{'k' if kill else ''}{int(time.time()) % 100000}"
    cpu_before = cpu_now(stack)
    restarts_before = {c: stack.children[c].restarts for c in COORDINATORS
                       if c in stack.children}
    killed: dict[str, Any] = {}
    t0 = time.time()
    sub = submit_kafka(stack, n, run_id)
    submit_s = time.time() - t0
    ids = set(sub.submitted)
    recorder.tracked |= ids

    def killer() -> None:
        while recorder.completed(ids) < n // 2:
            time.sleep(0.1)
        name = stack.active_coordinator()
        if name is None:
            killed["error"] = "no active coordinator found"
            return
        killed["name"], killed["at"] = name, time.time()
        stack.kill(name)

    thread = threading.Thread(target=killer, daemon=True) if kill else None
    if thread is not None:
        thread.start()
    finished = recorder.wait_done(ids, timeout_s)
    t_end = time.time()
    stages = recorder.snapshot(ids)
    done = stages["completed"]
    drain = (max(done.values()) - t0) if done else float("nan")
    cpu_after = cpu_now(stack)
    out: dict[str, Any] = {
        "tasks": n, "submit_s": round(submit_s, 2), "finished": len(done),
        "all_terminal": finished, "drain_s": round(drain, 2),
        "tasks_per_s": round(len(done) / drain, 1) if done else 0.0,
        "outcomes": recorder.outcome_kinds(ids),
        # a process killed meanwhile has no figure (its CPU went with it)
        "coordinator_cpu_s": {c: round(cpu_c - (cpu_before.get(c) or 0), 2)
                              if (cpu_c := cpu_after.get(c)) is not None
                              and c != killed.get("name")
                              else None for c in COORDINATORS if c in cpu_before},
        "coordinator_restarts": {c: stack.children[c].restarts - restarts_before[c]
                                 for c in restarts_before},
        "wall_s": round(t_end - t0, 2),
    }
    if kill:
        out["killed"] = killed.get("name", killed.get("error"))
        at = killed.get("at")
        if at is not None:
            after = sorted(ts for ts in stages["dispatched"].values() if ts > at)
            out["failover_s"] = round(after[0] - at, 2) if after else None
            stats = coordinator_stats(stack)
            out["standby"] = {k: stats.get(k) for k in (
                "instance", "standby_s", "recovery_s", "restore_s", "world_load_s",
                "recovered_rows", "changelog_records")}
    teams = load_teams(stack.settings().teams_file)
    log = read_log(stack.settings(), ids.__contains__)
    verdict = check(log, ids, lambda team: teams.policy(team).max_running)
    out["invariants_ok"] = verdict.ok
    out["invariants"] = verdict.counts()
    return out


def scenario(console: Console, tasks: int, timeout_s: float = 0.0,
             kill: bool = True) -> dict[str, Any]:
    """Both runs on a stack of their own (the kill leaves it without a standby)."""
    stack = start_stack(console)
    recorder = StageRecorder(stack)
    out: dict[str, Any] = {}
    try:
        recorder.start()
        warm_up(stack, recorder)
        timeout = timeout_s or max(600.0, tasks / 10)
        console.print(f"burst: {tasks:,} TaskSubmitted onto tasks.submitted ...")
        out["plain"] = run(stack, recorder, tasks, False, timeout)
        if kill:
            console.print(f"burst: {tasks:,} more, the active coordinator SIGKILLed midway ...")
            out["sigkill"] = run(stack, recorder, tasks, True, timeout)
    finally:
        recorder.stop()
        stack.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--no-kill", action="store_true", help="only the run without a kill")
    parser.add_argument("--kill-only", action="store_true", help="only the run with a kill")
    parser.add_argument("--timeout", type=float, default=0.0)
    args = parser.parse_args()
    console = Console()
    if args.kill_only:
        stack = start_stack(console)
        recorder = StageRecorder(stack)
        try:
            recorder.start()
            warm_up(stack, recorder)
            print(json.dumps(run(stack, recorder, args.tasks, True,
                                 args.timeout or max(600.0, args.tasks / 10))))
        finally:
            recorder.stop()
            stack.stop()
        return
    print(json.dumps(scenario(console, args.tasks, args.timeout, kill=not args.no_kill)))


if __name__ == "__main__":
    main()
