"""The ingest HTTP API in process (FastAPI TestClient) on the real test broker: tokens read from
fleet.tokens, submissions acknowledged by the broker. Auth failures, token guessing, per-team rate
limits, oversized and hostile manifests (hypothesis), idempotency conflicts."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from fleetplane.core.events import TaskSubmitted
from fleetplane.core.kafka import EventProducer
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.teams import parse_teams
from fleetplane.core.topics import SUBMITTED
from fleetplane.ingest.api import Intake, create_app
from fleetplane.ingest.idempotency import Mark, Marks, PublishedKeys, mark_key, spec_digest
from fleetplane.ingest.kvtopic import TopicTable
from fleetplane.ingest.manifest import TaskManifest, check_spec
from fleetplane.ingest.names import NameIndex
from fleetplane.ingest.taskview import TaskView
from fleetplane.ingest.tokens import TOKENS_TOPIC, TokenStore, issue
from tests.hostile import as_json, hostile_manifests, valid_manifest

OUTCOMES: Counter[str] = Counter()
TEAMS = parse_teams({"teams": {"slow": {"rate_limit": {"per_second": 0.5, "burst": 3}},
                               "fuzz-team": {"rate_limit": {"per_second": 1e6,
                                                            "burst": 1_000_000}}}})


@pytest.fixture(scope="module")
def tokens(base_settings: Settings) -> Iterator[tuple[TokenStore, dict[str, str]]]:
    """Tokens for three teams, issued on fleet.tokens and read back by a TopicTable."""
    store = TokenStore()
    issued = {team: issue(base_settings, team)[0] for team in ("slow", "fast", "fuzz-team")}
    table = TopicTable(base_settings, {TOKENS_TOPIC: store.apply})
    table.start()
    deadline = time.monotonic() + 30
    while any(store.verify(t) is None for t in issued.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield store, issued
    table.stop()


@pytest.fixture
def api(base_settings: Settings, tokens: tuple[TokenStore, dict[str, str]]
        ) -> Iterator[tuple[TestClient, Intake]]:
    producer = EventProducer(base_settings)
    intake = Intake(producer=producer, tokens=tokens[0], marks=Marks(3600), teams=TEAMS,
                    view=TaskView("http://127.0.0.1:9", timeout_s=1), max_request_bytes=300_000,
                    auth_failures_per_minute=60, auth_failure_burst=5)
    with TestClient(create_app(intake), raise_server_exceptions=False) as client:
        yield client, intake
    producer.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_missing_and_wrong_tokens_get_401_and_guessing_is_rate_limited(
        api: tuple[TestClient, Intake], tokens: tuple[TokenStore, dict[str, str]]) -> None:
    client, _ = api
    good = tokens[1]["fast"]
    assert client.get("/v1/whoami").status_code == 401
    assert client.get("/v1/whoami", headers={"Authorization": "Basic abc"}).status_code == 401
    r = client.get("/v1/whoami", headers=bearer(good))
    assert r.status_code == 200 and r.json()["team"] == "fast" and r.json()["role"] == "team"
    guesses = [good[:-4] + "AAAA", "fpt_" + "0" * 12 + "_" + "x" * 43, "not-a-token",
               good.replace("fpt_", "fpt_1"), good + "x"]
    assert [client.get("/v1/whoami", headers=bearer(g)).status_code for g in guesses] == [401] * 5
    blocked = client.get("/v1/whoami", headers=bearer(good[:-1] + "B"))
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
    # while blocked, the address gets no answer about any token (not even a right one)
    assert client.get("/v1/whoami", headers=bearer(good)).status_code == 429


def test_team_rate_limit_answers_429_with_retry_after(
        api: tuple[TestClient, Intake], tokens: tuple[TokenStore, dict[str, str]]) -> None:
    client, _ = api
    m = {**valid_manifest(), "metadata": {"name": "rl"}}
    codes = [client.post("/v1/tasks", json=m, headers=bearer(tokens[1]["slow"])).status_code
             for _ in range(4)]
    assert codes == [202, 202, 202, 429]
    r = client.post("/v1/tasks", json=m, headers=bearer(tokens[1]["slow"]))
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 2
    assert "slow" in r.json()["error"]
    other = client.post("/v1/tasks", json=m, headers=bearer(tokens[1]["fast"]))
    assert other.status_code == 202 and other.json()["team"] == "fast"


def test_oversized_and_non_object_bodies_are_refused(
        api: tuple[TestClient, Intake], tokens: tuple[TokenStore, dict[str, str]]) -> None:
    client, _ = api
    h = bearer(tokens[1]["fuzz-team"])
    huge = valid_manifest()
    huge["spec"]["prompt"] = "A" * 400_000
    assert client.post("/v1/tasks", json=huge, headers=h).status_code == 413
    for body in (b"[1, 2]", b"{not json", b"\xff\xfe", b"", b'"x"'):
        r = client.post("/v1/tasks", content=body, headers={**h, "Content-Type":
                                                           "application/json"})
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == "body", body
    deep = b"[" * 100_000 + b"]" * 100_000
    assert client.post("/v1/tasks", content=deep, headers=h).status_code in (400, 413)


def test_reads_answer_503_when_accounting_is_down(
        api: tuple[TestClient, Intake], tokens: tuple[TokenStore, dict[str, str]]) -> None:
    client, _ = api
    r = client.get("/v1/tasks", headers=bearer(tokens[1]["fast"]))
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert client.get("/v1/tasks", params={"state": "sleeping"},
                      headers=bearer(tokens[1]["fast"])).status_code == 422
    assert client.get("/v1/tasks/..%2Fetc", headers=bearer(tokens[1]["fast"])
                      ).status_code in (404, 422)


def test_an_idempotency_key_reused_with_another_manifest_is_a_conflict(
        api: tuple[TestClient, Intake], tokens: tuple[TokenStore, dict[str, str]]) -> None:
    client, intake = api
    h = bearer(tokens[1]["fast"])
    m = {**valid_manifest(), "metadata": {"name": "idem"}, "idempotencyKey": "k-1"}
    first = client.post("/v1/tasks", json=m, headers=h)
    # retried at once, before the ingest loop wrote the key's mark (no loop runs here): the
    # replica knows it published the key, so the retry is a replay of the same task
    second = client.post("/v1/tasks", json=m, headers=h)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["task_id"] == second.json()["task_id"]
    assert second.json()["idempotent_replay"] is True
    early_conflict = client.post("/v1/tasks", headers=h, json={
        **m, "spec": {**m["spec"], "prompt": "another prompt"}})
    assert early_conflict.status_code == 409
    # past the short window (the mark is what counts then), a retry is published again under
    # the same task id: a submission the broker lost is recreated
    intake.published = PublishedKeys(window_s=0.0)
    third = client.post("/v1/tasks", json=m, headers=h)
    assert third.status_code == 202 and third.json()["task_id"] == first.json()["task_id"]
    spec = TaskManifest.model_validate(m).to_spec()
    intake.marks.apply(mark_key("fast", "k-1"), Mark(first.json()["task_id"], "e",
                                                     spec_digest(spec), time.time()).to_json())
    replay = client.post("/v1/tasks", json=m, headers=h)
    assert replay.status_code == 200 and replay.json()["idempotent_replay"] is True
    changed = {**m, "spec": {**m["spec"], "prompt": "other"}}
    conflict = client.post("/v1/tasks", json=changed, headers=h)
    assert conflict.status_code == 409 and conflict.json()["errors"][0]["field"] == (
        "idempotencyKey")


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=hostile_manifests())
def test_hostile_manifests_get_a_clear_4xx_and_valid_ones_are_published(
        api: tuple[TestClient, Intake], tokens: tuple[TokenStore, dict[str, str]],
        doc: Any) -> None:
    client, _ = api
    r = client.post("/v1/tasks", content=as_json(doc),
                    headers={**bearer(tokens[1]["fuzz-team"]), "Content-Type": "application/json"})
    OUTCOMES[str(r.status_code)] += 1
    assert r.status_code in (202, 400, 403, 413, 422), (r.status_code, r.text[:500])
    body = r.json()
    if r.status_code == 202:
        m = TaskManifest.model_validate(doc)
        assert check_spec(body["team"], m.to_spec()) is None
        return
    assert body["error"]
    if r.status_code in (400, 403, 422):
        assert body["errors"] and all(isinstance(e["field"], str) and e["field"]
                                      for e in body["errors"])


def test_after_the_hostile_input_a_valid_task_still_reaches_kafka(
        api: tuple[TestClient, Intake], tokens: tuple[TokenStore, dict[str, str]],
        base_settings: Settings) -> None:
    client, _ = api
    print("\nhypothesis outcomes (HTTP, in process):", dict(sorted(OUTCOMES.items())))
    name = f"after-{uuid.uuid4().hex[:8]}"
    r = client.post("/v1/tasks", json={**valid_manifest(), "metadata": {"name": name}},
                    headers=bearer(tokens[1]["fuzz-team"]))
    assert r.status_code == 202
    c = Consumer({**base_settings.consumer_config(f"t-{name}"), "enable.auto.commit": False})
    c.subscribe([SUBMITTED])
    serde = default_serde()
    found = None
    deadline = time.monotonic() + 30
    try:
        while found is None and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error() is None and m.key() == r.json()["task_id"].encode():
                    found = serde.decode(m.value() or b"")
    finally:
        c.close()
    assert isinstance(found, TaskSubmitted)
    assert (found.team, found.spec.name, found.source) == ("fuzz-team", name, "http")


def read_submitted(settings: Settings, task_ids: set[str], timeout_s: float = 30.0
                   ) -> dict[str, TaskSubmitted]:
    """The TaskSubmitted records of these task ids on tasks.submitted (as a consumer sees them)."""
    c = Consumer({**settings.consumer_config(f"t-{uuid.uuid4().hex}"),
                  "enable.auto.commit": False})
    c.subscribe([SUBMITTED])
    serde = default_serde()
    found: dict[str, TaskSubmitted] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while found.keys() != task_ids and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error() is None and (m.key() or b"").decode() in task_ids:
                    e = serde.decode(m.value() or b"")
                    assert isinstance(e, TaskSubmitted)
                    found[e.task_id] = e
    finally:
        c.close()
    return found


def test_batch_submission_answers_each_item_and_publishes_the_valid_ones(
        api: tuple[TestClient, Intake], tokens: tuple[TokenStore, dict[str, str]],
        base_settings: Settings) -> None:
    client, _ = api
    h = bearer(tokens[1]["fuzz-team"])
    run = uuid.uuid4().hex[:8]
    good = [{**valid_manifest(), "metadata": {"name": f"b{i}-{run}"},
             "idempotencyKey": f"batch-{run}-{i}"} for i in range(6)]
    no_prompt = {**valid_manifest(), "spec": {k: v for k, v in valid_manifest()["spec"].items()
                                              if k != "prompt"}}
    other_team = {**valid_manifest(), "metadata": {"name": "x", "team": "fast"}}
    clash = {**good[0], "spec": {**good[0]["spec"], "prompt": "another prompt"}}
    items = [good[0], no_prompt, good[1], "not a manifest", other_team, *good[2:], good[0], clash]
    r = client.post("/v1/tasks:batch", json={"tasks": items}, headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert [x["index"] for x in results] == list(range(len(items)))
    assert [x["status"] for x in results] == [202, 422, 202, 422, 403, 202, 202, 202, 202,
                                              200, 409]
    assert {"field": "spec.prompt", "reason": "Field required"} in results[1]["errors"]
    assert results[3]["errors"][0]["field"] == "body"
    assert results[4]["errors"][0]["field"] == "metadata.team"
    assert results[9]["task_id"] == results[0]["task_id"] and results[9]["idempotent_replay"]
    assert results[10]["errors"][0]["field"] == "idempotencyKey"
    assert (body["accepted"], body["rejected"]) == (7, 4)
    published = read_submitted(base_settings, {x["task_id"] for x in results
                                               if x["status"] == 202})
    assert sorted(e.spec.name for e in published.values()) == sorted(
        m["metadata"]["name"] for m in good)
    # the same batch again: nothing new, the same task ids (the deterministic id of each key)
    again = client.post("/v1/tasks:batch", json={"tasks": good}, headers=h).json()["results"]
    assert [x["task_id"] for x in again] == [results[i]["task_id"] for i in (0, 2, 5, 6, 7, 8)]


def test_batch_limits_rate_and_scoping(
        api: tuple[TestClient, Intake], tokens: tuple[TokenStore, dict[str, str]]) -> None:
    client, intake = api
    fuzz = bearer(tokens[1]["fuzz-team"])
    m = valid_manifest()
    too_many = client.post("/v1/tasks:batch", json={"tasks": [m] * 1001}, headers=fuzz)
    assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "tasks"
    assert client.post("/v1/tasks:batch", json={"tasks": []}, headers=fuzz).status_code == 422
    assert client.post("/v1/tasks:batch", json=[m], headers=fuzz).status_code == 400
    wrong = client.post("/v1/tasks:batch", json={"tasks": [m], "extra": 1}, headers=fuzz)
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "extra"
    big = {**m, "spec": {**m["spec"], "prompt": "A" * 200_000}}
    intake.max_batch_bytes = 1_000_000
    assert client.post("/v1/tasks:batch", json={"tasks": [big] * 6},
                       headers=fuzz).status_code == 413
    assert client.post("/v1/tasks:batch", json={"tasks": [m]}).status_code == 401
    # the team's rate limit counts items: burst 3, so 3 accepted and the rest 429 with a wait
    slow = {**m, "metadata": {"name": "rl"}}
    r = client.post("/v1/tasks:batch", json={"tasks": [slow] * 5},
                    headers=bearer(tokens[1]["slow"])).json()
    assert [x["status"] for x in r["results"]] == [202, 202, 202, 429, 429]
    assert all(x["retry_after_s"] >= 1 for x in r["results"][3:])
    assert all(x["team"] == "slow" for x in r["results"][:3])


def test_a_batch_sends_a_dag_by_names_and_dependencies_are_published_as_task_ids(
        api: tuple[TestClient, Intake], tokens: tuple[TokenStore, dict[str, str]],
        base_settings: Settings) -> None:
    """dependsOn by name resolves to task ids at intake: an earlier manifest of the same batch,
    then the one task of the team with that name; several manifests or tasks of one name, or
    none, are refused with the entry at fault (accounting, which knows older ids, is down here:
    an entry nothing else resolves is a 503 to retry, not a guess)."""
    client, intake = api
    intake.names = NameIndex(3600)
    h = bearer(tokens[1]["fuzz-team"])
    run = uuid.uuid4().hex[:8]

    def m(name: str, *deps: str) -> dict[str, Any]:
        base = valid_manifest()
        return {**base, "metadata": {"name": f"{name}-{run}"},
                "spec": {**base["spec"], "dependsOn": [f"{d}-{run}" for d in deps]}}

    items = [m("fetch"), m("parse", "fetch"), m("report", "fetch", "parse"), m("dup"), m("dup"),
             m("uses-dup", "dup")]
    results = client.post("/v1/tasks:batch", json={"tasks": items}, headers=h).json()["results"]
    assert [x["status"] for x in results] == [202, 202, 202, 202, 202, 422]
    assert results[5]["errors"] == [{"field": "spec.dependsOn.0", "reason": (
        f"'dup-{run}' names several manifests of this request: give them distinct names")}]
    ids = [x.get("task_id") for x in results]
    published = read_submitted(base_settings, set(ids[:3]))
    assert published[ids[1]].spec.depends_on == [ids[0]]
    assert published[ids[2]].spec.depends_on == [ids[0], ids[1]]
    # later requests: a unique name resolves, two tasks of one name do not, an id always does
    later = client.post("/v1/tasks", json=m("later", "report"), headers=h)
    assert later.status_code == 202, later.text
    assert read_submitted(base_settings, {later.json()["task_id"]})[
        later.json()["task_id"]].spec.depends_on == [ids[2]]
    ambiguous = client.post("/v1/tasks", json=m("again", "dup"), headers=h)
    assert ambiguous.status_code == 422
    assert ambiguous.json()["errors"][0]["field"] == "spec.dependsOn.0"
    assert "names 2 tasks" in ambiguous.json()["errors"][0]["reason"]
    by_id = {**m("by-id"), "spec": {**m("by-id")["spec"], "dependsOn": [ids[3]]}}
    assert client.post("/v1/tasks", json=by_id, headers=h).status_code == 202
    # another team cannot depend on this team's task, by id or by name
    other = {**by_id, "metadata": {"name": "x"}}
    r = client.post("/v1/tasks", json=other, headers=bearer(tokens[1]["fast"]))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "spec.dependsOn.0"
    unknown = client.post("/v1/tasks", json=m("orphan", "never-submitted"), headers=h)
    assert unknown.status_code == 503 and unknown.headers["Retry-After"] == "1"
