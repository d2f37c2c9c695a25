"""Tenant isolation on the running stack: a team's token cannot see, list, cancel, approve or
reject another team's tasks, read its costs or budget, or spend its budget; admin-only endpoints
refuse team tokens; token guessing is rate-limited per client address. Every refused call is
checked for what a user would check: the status code, and that nothing reached Kafka."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from fleetplane import Client
from fleetplane.cli.stack import Stack
from fleetplane.client import NotFound, PermissionDenied
from fleetplane.core import events as ev
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import CONTROL, SUBMITTED

from .conftest import auth, eventually, manifest, settings_for, submit, wait_terminal

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]


def read_events(settings: Settings, topic: str, keep: Callable[[ev.Event], bool],
                timeout_s: float = 60.0) -> list[ev.Event]:
    """Every decodable event of `topic`, from the start to its end now, that `keep` selects."""
    c = Consumer({**settings.consumer_config(f"tenants-reader-{uuid.uuid4().hex}"),
                  "enable.auto.commit": False})
    serde = default_serde()
    out: list[ev.Event] = []
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {}
        for p in parts:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            for m in c.consume(1000, 0.3):
                if m.error():
                    continue
                if (m.offset() or 0) + 1 >= ends.get(m.partition() or 0, 0):
                    ends.pop(m.partition() or 0, None)
                try:
                    e = serde.decode(m.value() or b"")
                except Exception:
                    continue
                if keep(e):
                    out.append(e)
        assert not ends, f"{topic} not read to its end in {timeout_s}s"
    finally:
        c.close()
    return out


def commands_by(stack: Stack, *token_ids: str) -> list[ev.ControlCommand]:
    """ControlCommands on fleet.control requested through the API by these tokens."""
    def keep(e: ev.Event) -> bool:
        return isinstance(e, ev.ControlCommand) and e.requested_by.split("/")[-1] in token_ids
    return [e for e in read_events(settings_for(stack), CONTROL, keep)
            if isinstance(e, ev.ControlCommand)]


@pytest.fixture(scope="module")
def tenants(stack: Stack) -> dict[str, tuple[str, str]]:
    """team -> (token, token id) for two teams of this module."""
    run = uuid.uuid4().hex[:6]
    out = {}
    for team in (f"alpha-{run}", f"beta-{run}"):
        token = stack.issue_token(team)
        stack.wait_token(token)
        out[team] = (token, token.split("_")[1])
    return out


def wait_state(http: httpx.Client, stack: Stack, task_id: str, token: str, state: str,
               timeout_s: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        row = http.get(f"{stack.ingest_url}/v1/tasks/{task_id}", headers=auth(token)).json()
        if row.get("state") == state:
            return row
        time.sleep(0.3)
    raise AssertionError(f"task {task_id} is {row.get('state')}, not {state}, after "
                         f"{timeout_s}s: {row}")


def test_a_team_cannot_see_steer_or_charge_another_teams_work(
        stack: Stack, tenants: dict[str, tuple[str, str]],
        failing_once: Callable[[str], None]) -> None:
    (alpha, (a_tok, a_id)), (beta, (b_tok, b_id)) = tenants.items()
    url = stack.ingest_url
    run = uuid.uuid4().hex[:6]
    matrix: dict[tuple[str, str], int] = {}
    with httpx.Client(timeout=30) as http:
        # alpha: two tasks held for approval (failure policy hold; the first model call fails)
        held = []
        for i in range(2):
            marker = f"[approve-{run}-{i}]"
            failing_once(marker)
            held.append(submit(http, stack, manifest(alpha, f"held-{i}", f"{marker} summarize",
                                                     failurePolicy="hold"), token=a_tok))
        b_task = submit(http, stack, manifest(beta, "theirs", f"beta {run}"), token=b_tok)
        for task_id in held:
            row = wait_state(http, stack, task_id, a_tok, "held")
            assert "approval" in row["reason"] or row["reason"], row
        wait_terminal(http, stack, {b_task})
        a_budget = http.get(f"{url}/v1/budgets", headers=auth(a_tok)).json()
        assert [r["team"] for r in a_budget] == [alpha]
        # the period named as accounting names it (2026-12-06, 2026-W49, 2026-12), whether
        # accounting has a row for alpha yet or ingest answers "nothing spent" itself (it said
        # "day" until accounting's row replaced it: the two reads below differed in CI)
        assert re.fullmatch(r"\d{4}-(\d{2}-\d{2}|W\d{2}|\d{2})", a_budget[0]["period"]), a_budget

        def call(name: str, method: str, path: str, token: str, **kw: Any) -> httpx.Response:
            r = http.request(method, f"{url}{path}", headers=auth(token), **kw)
            who = "alpha" if token == a_tok else "beta" if token == b_tok else "admin"
            matrix[(name, who)] = r.status_code
            return r

        task = held[0]
        # beta on alpha's task: it does not exist for beta
        for name, method, suffix in (("get task", "GET", ""), ("events", "GET", "/events"),
                                     ("cancel", "POST", ":cancel"),
                                     ("approve", "POST", ":approve"),
                                     ("reject", "POST", ":reject")):
            r = call(name, method, f"/v1/tasks/{task}{suffix}", b_tok)
            assert r.status_code == 404, (name, r.text)
            assert alpha not in r.text
        listed = call("list own", "GET", "/v1/tasks", b_tok, params={"limit": 1000}).json()
        assert {r["task_id"] for r in listed} == {b_task}
        assert call("list other team", "GET", "/v1/tasks", b_tok,
                    params={"team": alpha}).status_code == 403
        assert call("cost of other team", "GET", "/v1/cost", b_tok,
                    params={"team": alpha}).status_code == 403
        assert call("budget of other team", "GET", "/v1/budgets", b_tok,
                    params={"team": alpha}).status_code == 403
        # beta's task is terminal; its model calls come from another topic (conftest.eventually)
        own_cost = eventually(lambda: call("cost", "GET", "/v1/cost", b_tok).json(),
                              lambda rows: bool(rows) and rows[0]["cost_usd"] > 0)
        assert [r["team"] for r in own_cost] == [beta] and own_cost[0]["cost_usd"] > 0
        by_model = call("cost", "GET", "/v1/cost", b_tok, params={"by": "model"}).json()
        assert sum(r["cost_usd"] for r in by_model) == pytest.approx(own_cost[0]["cost_usd"])
        own_budget = call("budget", "GET", "/v1/budgets", b_tok).json()
        assert [r["team"] for r in own_budget] == [beta]
        assert own_budget[0]["spent_usd"] == pytest.approx(own_cost[0]["cost_usd"], rel=1e-6)
        spoof = call("submit for other team", "POST", "/v1/tasks", b_tok,
                     json=manifest(alpha, f"spoof-{run}", "charge it to alpha"))
        assert spoof.status_code == 403 and spoof.json()["errors"][0]["field"] == "metadata.team"
        with Client(url, b_tok, max_retries=0) as sdk:  # the SDK raises the typed errors
            for refused_call in (lambda: sdk.approve(task), lambda: sdk.reject(task, "no")):
                with pytest.raises(NotFound):
                    refused_call()
            with pytest.raises(PermissionDenied):
                sdk.cost(team=alpha)
            with pytest.raises(PermissionDenied):
                sdk.budgets(team=alpha)
            assert [r["team"] for r in sdk.budgets()] == [beta]
        # beta's spend went to beta: alpha's budget is what it was
        assert http.get(f"{url}/v1/budgets", headers=auth(a_tok)).json() == a_budget

        spoofed = read_events(settings_for(stack), SUBMITTED,
                              lambda e: isinstance(e, ev.TaskSubmitted)
                              and e.spec.name == f"spoof-{run}")
        assert spoofed == []

        # the owner approves one and rejects the other; the admin sees alpha's costs
        assert call("approve", "POST", f"/v1/tasks/{held[0]}:approve", a_tok,
                    json={"reason": "looked at it"}).status_code == 202
        assert call("reject", "POST", f"/v1/tasks/{held[1]}:reject", stack.admin_token
                    ).status_code == 202  # an admin may steer any team's task
        rows = wait_terminal(http, stack, set(held))
        assert rows[held[0]]["state"] == "completed"
        assert rows[held[1]]["state"] == "failed" and "rejected by" in rows[held[1]]["reason"]
        admin_id = stack.admin_token.split("_")[1]
        sent = [c for c in commands_by(stack, a_id, b_id, admin_id)
                if c.task_id in {*held, b_task}]
        assert sorted((c.requested_by, c.command, c.task_id, c.team) for c in sent) == sorted(
            [(f"{alpha}/{a_id}", "approve", held[0], alpha),
             (f"operators/{admin_id}", "reject", held[1], alpha)])  # nothing from beta
        assert call("approve finished task", "POST", f"/v1/tasks/{held[0]}:approve", a_tok
                    ).status_code == 409
        assert call("get task", "GET", f"/v1/tasks/{task}", a_tok).status_code == 200
        admin_cost = eventually(  # the approved task's calls may trail its terminal row
            lambda: call("cost of other team", "GET", "/v1/cost", stack.admin_token,
                         params={"team": alpha}).json(),
            lambda rows: bool(rows) and rows[0]["cost_usd"] > 0)
        assert [r["team"] for r in admin_cost] == [alpha] and admin_cost[0]["cost_usd"] > 0
        everyone = call("cost", "GET", "/v1/cost", stack.admin_token).json()
        assert {alpha, beta} <= {r["team"] for r in everyone}
        budgets = call("budget", "GET", "/v1/budgets", stack.admin_token).json()
        assert {alpha, beta} <= {r["team"] for r in budgets}
        assert call("get task", "GET", f"/v1/tasks/{task}", stack.admin_token
                    ).status_code == 200
    print("\nisolation matrix (endpoint, caller -> status):")
    for (name, who), code in sorted(matrix.items()):
        print(f"  {name:24s} {who:6s} {code}")


def test_admin_endpoints_refuse_team_tokens_and_work_for_admins(
        stack: Stack, tenants: dict[str, tuple[str, str]]) -> None:
    (alpha, (_, first_id)), (beta, _) = tenants.items()
    a_tok = stack.issue_token(alpha)  # a token of its own: nothing on fleet.control names it
    a_id = a_tok.split("_")[1]
    stack.wait_token(a_tok)
    url = stack.ingest_url
    admin_id = stack.admin_token.split("_")[1]
    paused_team = f"paused-{uuid.uuid4().hex[:6]}"
    with httpx.Client(timeout=30) as http:
        for method, path, body in (
                ("POST", f"/v1/admin/teams/{alpha}:pause", None),
                ("POST", f"/v1/admin/teams/{beta}:pause", None),
                ("POST", f"/v1/admin/teams/{alpha}:resume", None),
                ("POST", "/v1/admin/kill-switch", {"state": "on"}),
                ("GET", "/v1/admin/tokens", None)):
            r = http.request(method, f"{url}{path}", headers=auth(a_tok), json=body)
            assert r.status_code == 403, (path, r.text)
            assert "admin" in r.json()["error"]

        with Client(url, a_tok, max_retries=0) as sdk:
            for refused_call in (lambda: sdk.pause_team(beta), lambda: sdk.resume_team(beta),
                                 lambda: sdk.kill_switch(True), lambda: sdk.tokens()):
                with pytest.raises(PermissionDenied):
                    refused_call()
        with Client(url, stack.admin_token) as admin_sdk:
            assert {t["token_id"] for t in admin_sdk.tokens(team=alpha)} == {first_id, a_id}
        tokens = http.get(f"{url}/v1/admin/tokens", headers=auth(stack.admin_token)).json()
        assert a_id in {t["token_id"] for t in tokens}
        assert all("sha256" not in t for t in tokens)
        assert a_tok.split("_", 2)[2] not in str(tokens)
        only = http.get(f"{url}/v1/admin/tokens", params={"team": alpha},
                        headers=auth(stack.admin_token)).json()
        assert [(t["team"], t["role"]) for t in only] == [(alpha, "team")] * 2

        # pause holds the team's new work; resume lets it run
        token = stack.issue_token(paused_team)
        stack.wait_token(token)
        assert http.post(f"{url}/v1/admin/teams/{paused_team}:pause",
                         headers=auth(stack.admin_token), json={"reason": "maintenance"}
                         ).status_code == 202
        time.sleep(1.0)  # the coordinator applies the pause before the task arrives
        task = submit(http, stack, manifest(paused_team, "waits", "paused work"), token=token)
        row = wait_state(http, stack, task, token, "held")
        assert "pause" in row["reason"], row
        assert http.post(f"{url}/v1/admin/teams/{paused_team}:resume",
                         headers=auth(stack.admin_token)).status_code == 202
        assert wait_terminal(http, stack, {task})[task]["state"] == "completed"

        # the kill switch: 422 for a bad body, then on and off (seen by the coordinator)
        assert http.post(f"{url}/v1/admin/kill-switch", headers=auth(stack.admin_token),
                         json={"state": "maybe"}).json()["errors"][0]["field"] == "state"
        fleet_url = f"http://127.0.0.1:{stack.coordinator_web_port}/coordinator/fleet/"
        for state, expected in (("on", True), ("off", False)):
            r = http.post(f"{url}/v1/admin/kill-switch", headers=auth(stack.admin_token),
                          json={"state": state, "reason": "drill"})
            assert r.status_code == 202, r.text
            deadline = time.monotonic() + 30
            while http.get(fleet_url).json().get("kill_switch") is not expected:
                assert time.monotonic() < deadline, f"kill switch not {state}"
                time.sleep(0.2)
        published = commands_by(stack, admin_id, a_id)
        assert [c for c in published if c.requested_by.endswith(a_id)] == []  # refused: none
        mine = [(c.command, c.team) for c in published if c.command != "cancel"]
        for expected_cmd in (("pause", paused_team), ("resume", paused_team),
                             ("kill_switch", ""), ("kill_switch_off", "")):
            assert expected_cmd in mine, mine


def test_token_guessing_is_rate_limited_per_address(
        stack: Stack, tenants: dict[str, tuple[str, str]]) -> None:
    """Guesses from one address (127.0.0.3, spoofing X-Forwarded-For) get 429 with Retry-After
    after the burst, even with the right token; a valid token from another address still works.
    (Other loopback addresses keep the rest of the session's 127.0.0.1 callers unaffected.)"""
    (_, (a_tok, _)), _ = tenants.items()
    url = f"{stack.ingest_url}/v1/whoami"
    guesser = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"), timeout=10)
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.4"), timeout=10)
    codes: list[int] = []
    with guesser, other:
        assert guesser.get(url).status_code == 401  # no token: does not count
        for i in range(40):
            guess = f"fpt_{uuid.uuid4().hex[:12]}_{uuid.uuid4().hex}"
            r = guesser.get(url, headers={**auth(guess), "X-Forwarded-For": f"10.0.0.{i}"})
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                break
        assert codes[-1] == 429 and set(codes[:-1]) == {401}, codes
        assert 20 <= len(codes) - 1 <= 25, codes  # the burst (20), plus what refilled
        right = guesser.get(url, headers=auth(a_tok))
        assert right.status_code == 429  # a right guess is not confirmed either
        assert other.get(url, headers=auth(a_tok)).status_code == 200
    print(f"\ntoken guessing: {len(codes) - 1} x 401 then 429 (Retry-After "
          f"{right.headers['Retry-After']} s); valid token from another address: 200")
