"""Coordinator failover with a large table: N TaskRouted dispatched by an active coordinator
(N rows in its table), a standby watching; the active is SIGKILLed and the time until the
standby has restored the table and decides again is measured (a figure, not a test).

Before the kill, both processes are left idle for ``--idle-s`` seconds (the active ticking, the
standby watching and following the changelog): their CPU over that window, and the broker's,
is what a coordinator pair costs while nothing happens. During the decisions the same figures
are taken for the burst of N (``cpu_s``).

    .venv/bin/python -m bench.coordinator_failover --tasks 20000

``--finished`` completes every task before the kill, so the table holds N finished tasks (what
a fleet accumulates); ``--max-finished-rows K`` sets FLEETPLANE_COORDINATOR_TERMINAL_MAX_ROWS
(the coordinator then forgets all but K of them; 0 keeps them all): the failover figures with
and without forgetting (docs/coordinator.md, "Forgetting finished tasks").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tests.integration.test_coordinator import CoordinatorProcess

from bench.measure import cpu_seconds, group_cpu_seconds
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ensure_topics, load_topics
from fleetplane.infra.broker import EmbeddedBroker, free_port


def run(tasks: int, data: Path, takeover_s: float, idle_s: float, finished: bool = False,
        max_rows: int | None = None) -> dict[str, object]:
    broker = EmbeddedBroker(data / "broker")
    broker.start()
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap)
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        port = free_port()
        env = {"FLEETPLANE_COORDINATOR_WEB_PORT": str(port), "FLEETPLANE_LOG_LEVEL": "INFO",
               "FLEETPLANE_COORDINATOR_TAKEOVER_S": str(takeover_s)}
        if max_rows is not None:
            env["FLEETPLANE_COORDINATOR_TERMINAL_MAX_ROWS"] = str(max_rows)
        procs = []
        for name in ("a", "b"):
            (data / name).mkdir()
            proc = CoordinatorProcess(settings, data / name, name, env=env)
            proc.port = port
            procs.append(proc)
        active, standby = procs
        active.start()
        active.wait_ready()
        standby.start()
        while "standby: watching" not in standby.log_tail(1_000_000):
            time.sleep(0.1)

        def cpu() -> dict[str, float | None]:
            return {"active": cpu_seconds(active.proc.pid if active.proc else None),
                    "standby": cpu_seconds(standby.proc.pid if standby.proc else None),
                    "broker": group_cpu_seconds(broker.pid)}

        def used(since: dict[str, float | None]) -> dict[str, float | None]:
            now = cpu()
            return {k: round(v - (since[k] or 0.0), 2) if v is not None else None
                    for k, v in now.items()}

        cpu0 = cpu()
        producer = EventProducer(settings)
        spec = ev.TaskSpec(name="n", task_type="summarize", prompt="p")
        t0 = time.monotonic()
        for i in range(0, tasks, 2000):
            producer.send([ev.TaskRouted(task_id=f"t-{j}", team="team", spec=spec, attempt=1,
                                         model="m", provider="anthropic", tier="standard",
                                         reason="bench") for j in range(i, min(tasks, i + 2000))])
        deadline = time.monotonic() + 1800
        while (active.stats() or {}).get("processed", 0) < tasks:
            assert time.monotonic() < deadline, "not decided in 30 minutes"
            assert standby.log_tail(1_000_000).count("taking the active role") == 0, (
                "the standby took over from a live active: its log line 'the active "
                "coordinator made no progress' says what the judgement saw")
            time.sleep(0.2)
        decided_s = time.monotonic() - t0
        busy_cpu = used(cpu0)
        if finished:
            for i in range(0, tasks, 2000):
                producer.send([ev.TaskCompleted(task_id=f"t-{j}", team="team", attempt=1,
                                                model="m", output="done", cost_usd=0.0,
                                                duration_ms=1)
                               for j in range(i, min(tasks, i + 2000))])
            want = tasks if max_rows is None or max_rows <= 0 else max_rows
            while (active.stats() or {}).get("task_events", 0) < 2 * tasks \
                    or (active.stats() or {}).get("terminal_rows", 0) > want:
                assert time.monotonic() < deadline, "not completed in 30 minutes"
                time.sleep(0.2)
        time.sleep(2.0)
        idle0, idle_t0 = cpu(), time.monotonic()
        time.sleep(idle_s)
        idle_cpu = {k: (round(v / (time.monotonic() - idle_t0), 3) if v is not None else None)
                    for k, v in used(idle0).items()}
        before = active.stats() or {}
        assert before.get("instance") == "a", before
        active.kill()
        killed = time.monotonic()
        while True:
            stats = standby.stats()
            if stats and stats.get("ready_s") is not None:
                break
            time.sleep(0.05)
        ready = time.monotonic() - killed
        producer.send([ev.TaskRouted(task_id="after", team="team", spec=spec, attempt=1,
                                     model="m", provider="anthropic", tier="standard",
                                     reason="bench")])
        processed = stats["processed"]
        while (standby.stats() or {}).get("processed", 0) <= processed:
            time.sleep(0.02)
        producer.close()
        standby.terminate()
        return {"tasks": tasks, "decided_s": round(decided_s, 1),
                "decisions_per_s": round(tasks / decided_s, 1), "rows": before.get("rows"),
                "failover_ready_s": round(ready, 2), "standby_s": stats.get("standby_s"),
                "restore_s": stats.get("restore_s"), "recovery_s": stats.get("recovery_s"),
                "changelog_records": stats.get("changelog_records"),
                "recovered_rows": stats.get("recovered_rows"),
                "world_load_s": stats.get("world_load_s"),
                "finished_rows_before": before.get("terminal_rows"),
                "forgotten_before": before.get("forgotten"),
                "cpu_s_while_deciding": busy_cpu, "idle_cores": idle_cpu, "idle_s": idle_s,
                "load_average": round(os.getloadavg()[0], 1)}
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--takeover-s", type=float, default=5.0)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--finished", action="store_true",
                        help="complete every task before the kill")
    parser.add_argument("--max-finished-rows", type=int, default=None,
                        help="FLEETPLANE_COORDINATOR_TERMINAL_MAX_ROWS (0: keep them all)")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="coordinator-failover-"))
    print(json.dumps({**run(args.tasks, data, args.takeover_s, args.idle_s, args.finished,
                            args.max_finished_rows), "logs": str(data)}))


if __name__ == "__main__":
    main()
