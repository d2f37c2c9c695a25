"""A task flows through all five services (real processes, real broker, chdb ClickHouse,
the fake provider over HTTP through the anthropic SDK)."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from confluent_kafka import Producer

from fleetplane.cli.stack import COORDINATOR_STANDBY, Stack
from fleetplane.core import events as ev
from fleetplane.core.catalog import Usage, catalog_for
from fleetplane.core.errors import EXIT_RESTART
from fleetplane.core.kafka import EventProducer
from fleetplane.core.topics import DLQ, SUBMITTED

from .conftest import auth, eventually, manifest, read_topic, settings_for, submit, wait_terminal

pytestmark = pytest.mark.e2e

TEAMS = ("payments", "search", "platform")
TYPES = ("summarize", "codegen", "architecture")


def test_fifty_tasks_complete_and_cost_per_team_matches_reported_usage(stack: Stack) -> None:
    run = uuid.uuid4().hex[:6]
    catalog = catalog_for(settings_for(stack).catalog_file)
    with httpx.Client(timeout=30) as http:
        http.post(f"{stack.provider_url}/_fake/reset")
        team_of: dict[str, str] = {}
        manifests = [manifest(f"{TEAMS[i % 3]}-{run}", f"t{i}", f"[{run}:{i}] {'work ' * (i + 1)}",
                              task_type=TYPES[i % 3]) for i in range(50)]
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda m: submit(http, stack, m), manifests))
        for task_id, m in zip(ids, manifests, strict=True):
            team_of[task_id] = m["metadata"]["team"]
        rows = wait_terminal(http, stack, set(ids))
        assert Counter(r["state"] for r in rows.values()) == {"completed": 50}

        # What the provider says it reported, priced with the catalog, summed per team.
        calls = http.get(f"{stack.provider_url}/_fake/calls").json()
        mine = [c for c in calls if f"[{run}:" in c["last_user_text"]]
        assert len(mine) == 50, "one model call per task"
        expected: Counter[str] = Counter()
        for c in mine:
            i = int(c["last_user_text"].split(":", 1)[1].split("]", 1)[0])
            team = manifests[i]["metadata"]["team"]
            u = c["usage"]
            expected[team] += catalog.model(c["model"]).cost(Usage(
                input_tokens=u["input_tokens"], output_tokens=u["output_tokens"],
                cache_creation_input_tokens=u.get("cache_creation_input_tokens", 0),
                cache_read_input_tokens=u.get("cache_read_input_tokens", 0)))
        teams = {m["metadata"]["team"] for m in manifests}
        by_team = eventually(  # the cost may trail the states by a sink batch
            lambda: {r["team"]: r for r in http.get(f"{stack.accounting_url}/v1/cost",
                                                     params={"by": "team"}).json()},
            lambda got: sum(got[t]["calls"] for t in teams if t in got) >= len(mine))
        for team in teams:
            assert by_team[team]["cost_usd"] == pytest.approx(expected[team], rel=1e-9)
            assert by_team[team]["calls"] == sum(1 for t in team_of.values() if t == team)
        assert sum(expected.values()) > 0


def test_bad_http_and_raw_kafka_input_is_rejected_and_the_flow_goes_on(stack: Stack) -> None:
    run = uuid.uuid4().hex[:6]
    settings = settings_for(stack)
    with httpx.Client(timeout=30) as http:
        bad = manifest("payments", "bad", "")
        bad["spec"]["writeScope"] = ["../../etc/passwd"]
        resp = http.post(f"{stack.ingest_url}/v1/tasks", json=bad, headers=auth(stack.admin_token))
        assert resp.status_code == 422
        fields = {e["field"] for e in resp.json()["errors"]}
        assert {"spec.prompt", "spec.writeScope"} <= fields

        raw = Producer(settings.producer_config())
        raw.produce(SUBMITTED, key=f"garbage-{run}".encode(), value=b"\x00\x01 definitely not avro")
        invalid = ev.TaskSubmitted(task_id=f"invalid-{run}", team="payments",
                                   spec=ev.TaskSpec(name="x", task_type="codegen", prompt="p",
                                                    failure_policy="pray"))
        producer = EventProducer(settings)
        producer.send([invalid])
        producer.close()
        raw.flush(10)

        good = submit(http, stack, manifest("payments", "after-bad", f"still flowing {run}"))
        rows = wait_terminal(http, stack, {good})
        assert rows[good]["state"] == "completed"

    dead = read_topic(settings, DLQ, {f"garbage-{run}", f"invalid-{run}"})
    reasons = {d.task_id: d.reason for d in dead if isinstance(d, ev.DeadLetter)}
    assert "single-object" in reasons[f"garbage-{run}"]
    assert "spec.failure_policy" in reasons[f"invalid-{run}"]


def test_services_stop_cleanly_on_sigterm(stack: Stack) -> None:
    """SIGTERM: each service finishes its batch, checkpoints, closes and exits 0 (all at once,
    as `fleetplane down` stops them)."""
    names = ["ingest", "router", "executor", "accounting", "coordinator"]
    stack.stop_children(names)
    try:
        for name in names:
            child = stack.children[name]
            assert child.proc is not None and child.proc.returncode == 0, (
                f"{name} exited with {child.proc.returncode if child.proc else None}; "
                f"see {child.log_path}")
    finally:  # the stack is shared by the e2e tests: a failure here must not fail them all
        for name in names:
            stack.restart(name)
        stack.wait_ready()


def test_a_coordinator_that_stood_down_is_restarted_and_the_stack_is_ready(stack: Stack) -> None:
    """A planned failover (SIGUSR2 to the standby): the standby claims the role, the active
    stands down and exits asking for a restart (EXIT_RESTART). `wait_ready` (as `fleetplane up`
    and the restarts above use it) starts it again as a standby instead of failing on it; the
    CI failure of stop 22 was that path taken by a standby that lost the role to a restarted
    coordinator."""
    stack.wait_ready()
    deadline = time.monotonic() + 60
    while (active := stack.active_coordinator()) is None:
        assert time.monotonic() < deadline, "no coordinator holds the active role"
        time.sleep(0.2)
    standby = COORDINATOR_STANDBY if active == "coordinator" else "coordinator"
    old, new = stack.children[active], stack.children[standby]
    restarts = old.restarts
    assert new.proc is not None and old.proc is not None
    # SIGUSR2 before the standby installed its handler would end it
    while "standby: watching" not in new.log_path.read_text().split("coordinator starting")[-1]:
        assert time.monotonic() < deadline and new.alive(), f"see {new.log_path}"
        time.sleep(0.2)
    new.proc.send_signal(signal.SIGUSR2)
    assert old.proc.wait(90) == EXIT_RESTART, f"see {old.log_path}"

    stack.wait_ready()
    assert old.restarts == restarts + 1 and old.alive() and new.alive()
    deadline = time.monotonic() + 60
    while stack.active_coordinator() != standby:
        assert time.monotonic() < deadline, f"the role did not move; see {new.log_path}"
        time.sleep(0.2)
    with httpx.Client(timeout=30) as http:
        task = submit(http, stack, manifest("search", "after-failover", "still flowing"))
        assert wait_terminal(http, stack, {task})[task]["state"] == "completed"
