"""Intake as teams use it: tokens and team scoping, idempotency keys (HTTP, raw Kafka, across an
ingest restart), cancellation, and the SDK, on the five services as real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import yaml
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetplane import Client
from fleetplane.cli.stack import Stack
from fleetplane.client import InvalidManifest, NotFound, PermissionDenied
from fleetplane.core import doorbell
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.topics import ACCEPTED, CONTROL, DLQ, LIFECYCLE, SUBMITTED
from tests.hostile import as_json, hostile_manifests, hostile_records

from .conftest import auth, manifest, read_topic, settings_for, submit, wait_terminal

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def teams(stack: Stack) -> dict[str, str]:
    """Two teams of this module with a token each (ingest learns them from fleet.tokens)."""
    run = uuid.uuid4().hex[:6]
    tokens = {f"alpha-{run}": "", f"beta-{run}": ""}
    for team in tokens:
        tokens[team] = stack.issue_token(team)
    for token in tokens.values():
        stack.wait_token(token)
    return tokens


def test_a_team_sees_lists_and_cancels_only_its_own_tasks(stack: Stack,
                                                          teams: dict[str, str]) -> None:
    (alpha, a_tok), (beta, b_tok) = teams.items()
    url = stack.ingest_url
    with httpx.Client(timeout=30) as http:
        assert http.post(f"{url}/v1/tasks", json=manifest(alpha, "x", "p")).status_code == 401
        assert http.get(f"{url}/v1/tasks", headers=auth("fpt_000000000000_" + "x" * 43)
                        ).status_code == 401
        no_team = manifest(alpha, "own", "summarize this")
        del no_team["metadata"]["team"]
        resp = http.post(f"{url}/v1/tasks", json=no_team, headers=auth(a_tok))
        assert resp.status_code == 202 and resp.json()["team"] == alpha, resp.text
        a_task = resp.json()["task_id"]
        other = http.post(f"{url}/v1/tasks", json=manifest(beta, "spoof", "p"),
                          headers=auth(a_tok))
        assert other.status_code == 403
        assert other.json()["errors"][0]["field"] == "metadata.team"
        a_code = submit(http, stack, manifest(alpha, "gen", "write code", task_type="codegen"),
                        token=a_tok)
        b_task = submit(http, stack, manifest(beta, "theirs", "beta work"), token=b_tok)
        wait_terminal(http, stack, {a_task, a_code, b_task})

        assert http.get(f"{url}/v1/tasks/{a_task}", headers=auth(a_tok)).json()["state"] == (
            "completed")
        assert http.get(f"{url}/v1/tasks/{a_task}", headers=auth(b_tok)).status_code == 404
        assert http.get(f"{url}/v1/tasks/{a_task}/events", headers=auth(b_tok)
                        ).status_code == 404
        assert http.post(f"{url}/v1/tasks/{a_task}:cancel", headers=auth(b_tok)
                         ).status_code == 404
        b_list = http.get(f"{url}/v1/tasks", params={"limit": 1000}, headers=auth(b_tok)).json()
        assert {r["task_id"] for r in b_list} == {b_task}
        assert http.get(f"{url}/v1/tasks", params={"team": alpha}, headers=auth(b_tok)
                        ).status_code == 403
        codegen = http.get(f"{url}/v1/tasks", params={"type": "codegen"},
                           headers=auth(a_tok)).json()
        assert [r["task_id"] for r in codegen] == [a_code]
        done = http.get(f"{url}/v1/tasks", params={"state": "completed"},
                        headers=auth(a_tok)).json()
        assert {r["task_id"] for r in done} == {a_task, a_code}
        admin = http.get(f"{url}/v1/tasks", params={"team": alpha},
                         headers=auth(stack.admin_token)).json()
        assert {r["task_id"] for r in admin} == {a_task, a_code}
        assert http.get(f"{url}/v1/tasks/{b_task}", headers=auth(stack.admin_token)
                        ).status_code == 200
        timeline = http.get(f"{url}/v1/tasks/{a_task}/events", headers=auth(a_tok)).json()
        # a heartbeat sent as the attempt ends may carry a later time than the completion
        # (liveness, not lifecycle): the lifecycle ends with the completion
        kinds = [e["event_type"] for e in timeline if e["event_type"] != "TaskHeartbeat"]
        assert kinds[0] == "TaskSubmitted" and kinds[-1] == "TaskCompleted"
        finished = http.post(f"{url}/v1/tasks/{a_task}:cancel", headers=auth(a_tok))
        assert finished.status_code == 409


def test_sdk_cancels_a_running_task(stack: Stack, teams: dict[str, str]) -> None:
    alpha, a_tok = next(iter(teams.items()))
    run = uuid.uuid4().hex[:6]
    with httpx.Client(timeout=30) as http:
        saved = http.get(f"{stack.provider_url}/_fake/script").json()
        slow = {**saved, "replies": [*saved.get("replies", []),
                                     {"match": f"[slow-{run}]", "latency_ms": 60_000,
                                      "times": 5}]}
        assert http.post(f"{stack.provider_url}/_fake/script", json=slow).status_code < 300
        try:
            path = stack.data_dir / f"slow-{run}.yaml"
            path.write_text(yaml.safe_dump(manifest(alpha, "slow", f"[slow-{run}] take your time")))
            with Client(stack.ingest_url, a_tok) as sdk:
                with pytest.raises(InvalidManifest) as bad:
                    sdk.submit(manifest(alpha, "Bad Name", ""))
                assert {e["field"] for e in bad.value.errors} == {"metadata.name", "spec.prompt"}
                assert bad.value.status == 422 and not bad.value.retriable
                sub = sdk.submit(path)
                deadline = time.monotonic() + 60
                busy = ("dispatched", "running")
                while sdk.get(sub.task_id).state not in busy and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert sdk.get(sub.task_id).state in busy  # its model call takes 60 s
                with Client(stack.ingest_url, teams[list(teams)[1]]) as other, \
                        pytest.raises(NotFound):
                    other.cancel(sub.task_id)
                # the API rings fleet.control's doorbell once the command is acknowledged, so
                # the parked coordinator and executors read it at once; the ring names the
                # partition the command was written to (they probe that one alone)
                bell = doorbell.Listener(stack.bootstrap, [CONTROL])
                try:
                    bell.drain()
                    bell.take()
                    assert sdk.cancel(sub.task_id, "no longer needed")["state"] == "cancelling"
                    assert bell.wait(10)
                    named = bell.take()
                    assert named is not None and len(named) == 1, named
                    assert next(iter(named))[0] == CONTROL
                finally:
                    bell.close()
                final = sdk.wait(sub.task_id, timeout=60)
                assert final.state == "cancelled"
                with pytest.raises(PermissionDenied):
                    sdk.list(team=list(teams)[1])
        finally:
            http.post(f"{stack.provider_url}/_fake/script", json=saved)


def test_sdk_submit_many_runs_the_valid_manifests_and_names_the_bad_ones(
        stack: Stack, teams: dict[str, str]) -> None:
    alpha, a_tok = next(iter(teams.items()))
    run = uuid.uuid4().hex[:6]
    docs = [manifest(alpha, f"many-{i}", f"summarize batch item {i} of {run}") for i in range(40)]
    docs[7] = manifest(alpha, "Bad Name", "p")
    docs[30] = {**docs[30], "idempotencyKey": f"many-{run}"}
    path = stack.data_dir / f"many-{run}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    with Client(stack.ingest_url, a_tok) as sdk:
        results = sdk.submit_many(path, chunk=16)  # three requests
        assert [r.index for r in results] == list(range(40))
        assert [r.status for r in results].count(202) == 39
        assert results[7].status == 422 and not results[7].ok
        assert results[7].errors[0]["field"] == "metadata.name"
        again = sdk.submit_many([docs[30]])
        assert again[0].status == 200 and again[0].task_id == results[30].task_id
    ids = {r.task_id for r in results if r.ok}
    with httpx.Client(timeout=30) as http:
        rows = wait_terminal(http, stack, ids)
    assert {r["state"] for r in rows.values()} == {"completed"}


def _accepted(stack: Stack, ids: set[str]) -> Counter[str]:
    return Counter(e.task_id for e in read_topic(settings_for(stack), ACCEPTED, ids, idle_s=2)
                   if isinstance(e, ev.TaskAccepted))


def test_idempotency_keys_give_one_task_over_http_and_kafka_across_an_ingest_restart(
        stack: Stack, teams: dict[str, str]) -> None:
    (alpha, a_tok), (beta, b_tok) = teams.items()
    run = uuid.uuid4().hex[:8]
    key = f"deploy-{run}"
    m: dict[str, Any] = {**manifest(alpha, "once", "do it once"), "idempotencyKey": key}
    url = stack.ingest_url
    # raw Kafka path: a keyed submission, later retried and re-sent under a new task id
    spec = ev.TaskSpec(name="raw", task_type="summarize", prompt=f"raw path {run}")
    raw1 = ev.TaskSubmitted(task_id=f"raw1-{run}", team=alpha, spec=spec,
                            idempotency_key=f"raw-{run}")
    raw_retry = raw1.model_copy(update={"event_id": ev.new_event_id()})
    raw2 = ev.TaskSubmitted(task_id=f"raw2-{run}", team=alpha, spec=spec,
                            idempotency_key=f"raw-{run}")
    producer = EventProducer(settings_for(stack))
    try:
        producer.send([raw1])
        with httpx.Client(timeout=30) as http:
            first = http.post(f"{url}/v1/tasks", json=m, headers=auth(a_tok))
            again = http.post(f"{url}/v1/tasks", json=m, headers=auth(a_tok))
            assert first.status_code == 202 and again.status_code in (200, 202)
            task_id = first.json()["task_id"]
            assert again.json()["task_id"] == task_id
            wait_terminal(http, stack, {task_id, raw1.task_id})
            stack.restart("ingest")  # the marks must survive it
            stack.wait_ready()
            stack.wait_token(a_tok)
            producer.send([raw_retry, raw2])
            after = http.post(f"{url}/v1/tasks", json=m, headers=auth(a_tok))
            assert after.status_code == 200, after.text
            assert after.json() == {**first.json(), "idempotent_replay": True}
            changed = {**m, "spec": {**m["spec"], "prompt": "something else"}}
            conflict = http.post(f"{url}/v1/tasks", json=changed, headers=auth(a_tok))
            assert conflict.status_code == 409
            b_m = {**manifest(beta, "once", "do it once"), "idempotencyKey": key}
            theirs = http.post(f"{url}/v1/tasks", json=b_m, headers=auth(b_tok))
            assert theirs.status_code == 202 and theirs.json()["task_id"] != task_id
            rows = wait_terminal(http, stack, {raw2.task_id, theirs.json()["task_id"]})
    finally:
        producer.close()
    assert rows[raw2.task_id]["state"] == "rejected"
    assert raw1.task_id in rows[raw2.task_id]["reason"]
    ids = {task_id, raw1.task_id, raw2.task_id}
    assert _accepted(stack, ids) == {task_id: 1, raw1.task_id: 1}
    rejected = [e for e in read_topic(settings_for(stack), LIFECYCLE, ids, idle_s=2)
                if isinstance(e, ev.TaskRejected)]
    assert [(e.task_id, e.field) for e in rejected] == [(raw2.task_id, "idempotency_key")]


def test_hostile_input_on_both_paths_is_rejected_and_ingest_keeps_flowing(stack: Stack) -> None:
    """Hypothesis throws hostile raw records at tasks.submitted and hostile manifests at the
    running ingest; each gets a clear rejection, the process stays up, a valid task completes."""
    run = uuid.uuid4().hex[:6]
    settings_ = settings_for(stack)
    raw = Producer(settings_.producer_config())
    sent: dict[str, str] = {}

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def throw_records(data: st.DataObject) -> None:
        key = f"fuzz-{run}-{len(sent)}"
        kind, value = data.draw(hostile_records(task_id=key))
        raw.produce(SUBMITTED, key=key.encode(), value=value)
        sent[key] = kind

    throw_records()
    assert raw.flush(30) == 0
    token = stack.issue_token("fuzz-team")
    stack.wait_token(token)
    codes: Counter[int] = Counter()
    with httpx.Client(timeout=30) as http:

        @settings(max_examples=60, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])
        @given(doc=hostile_manifests())
        def throw_manifests(doc: Any) -> None:
            r = http.post(f"{stack.ingest_url}/v1/tasks", content=as_json(doc),
                          headers={**auth(token), "Content-Type": "application/json"})
            codes[r.status_code] += 1
            assert r.status_code in (202, 400, 403, 413, 422), r.text[:300]
            if r.status_code in (400, 403, 422):
                assert all(e["field"] for e in r.json()["errors"])

        throw_manifests()
        assert stack.children["ingest"].alive()
        good = submit(http, stack, manifest("payments", "after-fuzz", f"still flowing {run}"))
        assert wait_terminal(http, stack, {good})[good]["state"] == "completed"
    # (accounting dead-letters the undecodable ones too, as it reads every topic)
    dead = {d.task_id: d for d in read_topic(settings_, DLQ, set(sent), idle_s=2)
            if isinstance(d, ev.DeadLetter) and d.service == "ingest"}
    accepted = _accepted(stack, set(sent))
    outcome: Counter[str] = Counter()
    for key, kind in sent.items():
        if key in accepted:
            outcome[f"{kind}: accepted"] += 1
            continue
        assert key in dead, f"{kind} record {key} neither accepted nor dead-lettered"
        assert dead[key].reason and dead[key].error_class in ("DecodeError", "Rejected")
        outcome[f"{kind}: {dead[key].error_class}"] += 1
    print(f"\nhypothesis outcomes (e2e): raw {dict(sorted(outcome.items()))}; "
          f"HTTP {dict(sorted(codes.items()))}")


def test_cli_tokens_get_describe_cancel_as_a_team(stack: Stack) -> None:
    """The kubectl-like commands, run as a user runs them, against the running stack."""
    def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPLANE_")}
        env.update({"FLEETPLANE_KAFKA_BOOTSTRAP": stack.bootstrap, "COLUMNS": "250",
                    "FLEETPLANE_DATA_DIR": str(stack.data_dir),
                    "FLEETPLANE_INGEST_URL": stack.ingest_url,
                    "FLEETPLANE_CONFIG_FILE": str(stack.data_dir / "no-config.yaml")})
        if token:
            env["FLEETPLANE_TOKEN"] = token
        return subprocess.run([sys.executable, "-m", "fleetplane.cli.main", *args], env=env,
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    team = f"cli-{uuid.uuid4().hex[:6]}"
    created = cli("token", "create", "--team", team, "--description", "ci")
    assert created.returncode == 0, created.stderr
    token = re.search(r"^(fpt_[0-9a-f]{12}_\S+)$", created.stdout, re.M)
    assert token, created.stdout
    token_id = token.group(1).split("_")[1]
    # independent commands run side by side, as several users would (each CLI start costs
    # seconds of imports on a loaded machine)
    with ThreadPoolExecutor(4) as pool:
        listed = pool.submit(cli, "token", "list", "--team", team)
        stranger_token = pool.submit(stack.issue_token, "strangers")
        stack.wait_token(token.group(1))

        m = stack.data_dir / f"{team}.yaml"
        m.write_text(f"apiVersion: fleetplane/v1\nkind: AgentTask\nmetadata: {{name: cli-task}}\n"
                     f"spec: {{taskType: codegen, prompt: 'cli {team}'}}\n")
        sub = cli("submit", "-f", str(m), token=token.group(1))
        assert sub.returncode == 0, sub.stderr
        task_id = re.search(r"submitted: ([0-9a-f]{32}) \(team (\S+)\)", sub.stdout)
        assert task_id and task_id.group(2) == team, sub.stdout
        assert token_id in listed.result().stdout and token.group(1) not in listed.result().stdout
        with httpx.Client(timeout=30) as http:
            wait_terminal(http, stack, {task_id.group(1)})
        stack.wait_token(stranger_token.result())
        got, described, finished, stranger = (pool.submit(cli, *args, token=t) for args, t in (
            (("get", "tasks", "--type", "codegen"), token.group(1)),
            (("describe", "task", task_id.group(1)), token.group(1)),
            (("cancel", task_id.group(1)), token.group(1)),
            (("describe", "task", task_id.group(1)), stranger_token.result())))
        got_r, described_r, finished_r, stranger_r = (
            f.result() for f in (got, described, finished, stranger))
    assert got_r.returncode == 0 and task_id.group(1) in got_r.stdout \
        and "completed" in got_r.stdout
    assert described_r.returncode == 0, described_r.stderr
    for needle in ("TaskSubmitted", "TaskAccepted", "TaskRouted", "TaskCompleted", team):
        assert needle in described_r.stdout, described_r.stdout
    assert finished_r.returncode == 1 and "already completed" in finished_r.stderr
    assert stranger_r.returncode == 1 and f"no task {task_id.group(1)}" in stranger_r.stderr
    assert cli("token", "revoke", token_id).returncode == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(
            f"{stack.ingest_url}/v1/whoami", headers=auth(token.group(1))).status_code == 200:
        time.sleep(0.2)
    refused = cli("get", "tasks", token=token.group(1))
    assert refused.returncode == 1 and "invalid or revoked token" in refused.stderr


def test_dependencies_by_name_resolve_at_intake_and_a_failed_dependency_fails_its_dependent(
        stack: Stack, failing_once: Callable[[str], None]) -> None:
    """A dependency given by name becomes the id of the one task of the team with that name; a
    name of no task or of two is refused with the entry at fault; a dependent of a task that
    failed fails at once instead of waiting for good (issue 16)."""
    run = uuid.uuid4().hex[:6]
    team = f"deps-{run}"
    marker = f"[upstream-{run}]"
    failing_once(marker)
    with httpx.Client(timeout=30) as http:
        upstream = submit(http, stack, manifest(team, f"upstream-{run}", f"{marker} summarize",
                                                failurePolicy="abandon"))
        dependent = submit(http, stack, manifest(team, f"dependent-{run}", "summarize it",
                                                 dependsOn=[f"upstream-{run}"]))
        done = wait_terminal(http, stack, {upstream, dependent}, timeout_s=120)
        assert done[upstream]["state"] == "abandoned"
        assert done[dependent]["state"] == "failed"
        assert upstream in done[dependent]["reason"], done[dependent]
        submitted = read_topic(settings_for(stack), SUBMITTED, {dependent})
        assert {tuple(e.spec.depends_on) for e in submitted
                if isinstance(e, ev.TaskSubmitted)} == {(upstream,)}

        def refused(deps: list[str]) -> dict[str, Any]:
            r = http.post(f"{stack.ingest_url}/v1/tasks", headers=auth(stack.admin_token),
                          json=manifest(team, f"later-{run}", "x", dependsOn=deps))
            assert r.status_code == 422, r.text
            (error,) = r.json()["errors"]
            return dict(error)

        unknown = refused([upstream, f"nothing-{run}"])
        assert unknown["field"] == "spec.dependsOn.1" and "names no task" in unknown["reason"]
        # another team's task id is not a dependency of this team
        other = submit(http, stack, manifest(f"other-{run}", "theirs", "summarize"))
        assert refused([other])["field"] == "spec.dependsOn.0"
        submit(http, stack, manifest(team, f"upstream-{run}", "summarize again"))
        ambiguous = refused([f"upstream-{run}"])
        assert ambiguous["field"] == "spec.dependsOn.0" and "2 tasks" in ambiguous["reason"]
        # an id always names one task, however many share its name
        assert http.post(f"{stack.ingest_url}/v1/tasks", headers=auth(stack.admin_token),
                         json=manifest(team, f"by-id-{run}", "x", dependsOn=[upstream])
                         ).status_code == 202
