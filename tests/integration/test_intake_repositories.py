"""Issue 16 on the real test broker: repositories as a resource (the admin API on ingest,
persisted on the compacted topic fleet.repositories, followed by a second reader as another
replica or an executor would), manifests refused at the door with the field, a 10 MB body
answered 413 by a real HTTP server (uvicorn), and a registered repository checked out and edited
by the executor's Workspaces."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import Processor, Record
from fleetplane.core.serde import default_serde
from fleetplane.core.service import serve_http_in_thread
from fleetplane.core.settings import Settings
from fleetplane.core.teams import parse_teams
from fleetplane.core.topics import ACCEPTED, DLQ, LIFECYCLE, SUBMITTED
from fleetplane.executor.workspace import WorkspaceConfigError, Workspaces
from fleetplane.infra.broker import free_port, port_open
from fleetplane.ingest.api import Intake, create_app
from fleetplane.ingest.handlers import accept
from fleetplane.ingest.idempotency import Marks
from fleetplane.ingest.kvtopic import TopicTable, TopicWriter
from fleetplane.ingest.repositories import (
    REPOSITORIES_TOPIC,
    CheckoutResolver,
    RepositoryRegistry,
    list_registered,
)
from fleetplane.ingest.taskview import TaskView
from fleetplane.ingest.tokens import TOKENS_TOPIC, TokenStore, issue
from tests.integration.test_loop import read_all

TEAMS = parse_teams({"teams": {"door": {"rate_limit": {"per_second": 1e6, "burst": 1_000_000}}}})


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


def bare_repository(where: Path) -> Path:
    src = where / "src"
    (src / "src" / "iban").mkdir(parents=True)
    (src / "src" / "iban" / "__init__.py").write_text("")
    git("init", "-q", "-b", "main", str(src))
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "init", cwd=src)
    bare = where / "repo.git"
    git("clone", "-q", "--bare", str(src), str(bare))
    return bare


@pytest.fixture(scope="module")
def door(base_settings: Settings) -> Iterator[dict[str, Any]]:
    tokens = TokenStore()
    admin_token = issue(base_settings, "ops", "admin")[0]
    team_token = issue(base_settings, "door")[0]
    registry = RepositoryRegistry()
    table = TopicTable(base_settings, {TOKENS_TOPIC: tokens.apply,
                                       REPOSITORIES_TOPIC: registry.apply})
    table.start()
    deadline = time.monotonic() + 30
    while (tokens.verify(admin_token) is None or tokens.verify(team_token) is None) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    producer = EventProducer(base_settings)
    writer = TopicWriter(base_settings)
    intake = Intake(producer=producer, tokens=tokens, marks=Marks(3600), teams=TEAMS,
                    view=TaskView("http://127.0.0.1:9", timeout_s=1), repositories=registry,
                    writer=writer, max_request_bytes=1_048_576)
    yield {"intake": intake, "app": create_app(intake), "registry": registry,
           "admin": {"Authorization": f"Bearer {admin_token}"},
           "team": {"Authorization": f"Bearer {team_token}"}}
    table.stop()
    writer.close()
    producer.close()


@pytest.fixture
def client(door: dict[str, Any]) -> Iterator[TestClient]:
    with TestClient(door["app"], raise_server_exceptions=False) as c:
        yield c


def manifest(name: str = "t1", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
            "metadata": {"name": name, "team": "door"},
            "spec": {"taskType": "codegen", "prompt": "edit it", "writeScope": ["src/**"],
                     **spec}}


def fields(resp: httpx.Response) -> list[str]:
    return [e["field"] for e in resp.json().get("errors", [])]


def test_repositories_api_is_persisted_on_the_topic(
        client: TestClient, door: dict[str, Any], base_settings: Settings, unique: str,
        tmp_path: Path) -> None:
    name = f"repo-{unique}"[:60].lower()
    url = f"/v1/admin/repositories/{name}"
    # a team token reads but may not register
    denied = client.put(url, json={"location": str(tmp_path)}, headers=door["team"])
    assert denied.status_code == 403 and "admin" in denied.json()["error"]
    assert client.put(url, json={"location": str(tmp_path)}).status_code == 401
    created = client.put(url, json={"location": str(tmp_path), "description": "d"},
                         headers=door["admin"])
    assert created.status_code == 201, created.text
    assert created.json()["kind"] == "path" and created.json()["created_by"].startswith("ops/")
    again = client.put(url, json={"location": "https://git.example.com/x.git"},
                       headers=door["admin"])
    assert again.status_code == 200 and again.json()["kind"] == "url"
    listed = client.get("/v1/admin/repositories", headers=door["team"])
    assert listed.status_code == 200 and name in [r["name"] for r in listed.json()]
    assert client.get(url, headers=door["admin"]).json()["location"].startswith("https://")
    # a team token sees the name (to submit with it), not where it lives or who added it
    seen = client.get(url, headers=door["team"]).json()
    assert seen["name"] == name and "location" not in seen and "created_by" not in seen
    assert all("location" not in r for r in listed.json())
    # persisted: another reader of fleet.repositories (a second replica, an executor) sees it
    other = RepositoryRegistry()
    reader = TopicTable(base_settings, {REPOSITORIES_TOPIC: other.apply})
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while not other.known(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.get(name)["location"] == "https://git.example.com/x.git"  # type: ignore[index]
        # bad input names the field
        for body, field in (({"location": "relative/dir"}, "location"),
                            ({"location": "-oProxyCommand=x"}, "location"),
                            ({"location": "/x", "owner": "me"}, "owner"),
                            ({"location": 3}, "location")):
            r = client.put(url, json=body, headers=door["admin"])
            assert r.status_code == 422 and fields(r) == [field], (body, r.text)
        r = client.put("/v1/admin/repositories/Bad_Name", json={"location": "/x"},
                       headers=door["admin"])
        assert r.status_code == 422 and fields(r) == ["name"]
        # remove: admin only, then unknown everywhere
        assert client.delete(url, headers=door["team"]).status_code == 403
        assert client.delete(url, headers=door["admin"]).status_code == 200
        assert client.delete(url, headers=door["admin"]).status_code == 404
        assert client.get(url, headers=door["admin"]).status_code == 404
        deadline = time.monotonic() + 20
        while other.known(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not other.known(name)
        assert name not in [r["name"] for r in list_registered(base_settings)]
    finally:
        reader.stop()


def test_each_refused_manifest_class_names_its_field(
        client: TestClient, door: dict[str, Any], tmp_path: Path) -> None:
    ok = client.put("/v1/admin/repositories/door-repo", json={"location": str(tmp_path)},
                    headers=door["admin"])
    assert ok.status_code in (200, 201)
    h = door["team"]
    cases = [
        (manifest(tools=["read_file", "launch_missiles"]), "spec.tools"),
        (manifest(workspace={"repository": "not-registered"}), "spec.workspace.repository"),
        (manifest(workspace={"repository": "../../etc"}), "spec.workspace.repository"),
        (manifest(workspace={"repository": "/srv/git/payments"}), "spec.workspace.repository"),
        (manifest(workspace={"repository": "door-repo", "ref": "-oops"}),
         "spec.workspace.ref"),
        (manifest(workspace={"repository": "door-repo", "ref": "main..x"}),
         "spec.workspace.ref"),
        (manifest(workspace={"repository": "door-repo", "ref": "x.lock"}),
         "spec.workspace.ref"),
        (manifest("t1", dependsOn=["t1"]), "spec.dependsOn"),
    ]
    for doc, field in cases:
        r = client.post("/v1/tasks", json=doc, headers=h)
        assert r.status_code == 422, (doc["spec"], r.status_code, r.text)
        assert field in [f.rsplit(".", 1)[0] if f[-1].isdigit() else f for f in fields(r)], \
            (field, r.text)
    # a dependency naming its own task id (known at intake from the idempotency key)
    from fleetplane.ingest.idempotency import task_id_for

    own = task_id_for("door", "k-self")
    r = client.post("/v1/tasks", json={**manifest("t2", dependsOn=[own]),
                                       "idempotencyKey": "k-self"}, headers=h)
    assert r.status_code == 422 and fields(r) == ["spec.dependsOn"], r.text
    # the batch path answers the same per item
    batch = client.post("/v1/tasks:batch", json={"tasks": [c[0] for c in cases]}, headers=h)
    assert batch.status_code == 200 and batch.json()["rejected"] == len(cases)
    # and a valid manifest on the registered repository is accepted
    good = client.post("/v1/tasks", json=manifest(
        "t3", workspace={"repository": "door-repo", "ref": "release/1"},
        tools=["read_file", "write_file"]), headers=h)
    assert good.status_code == 202, good.text


def test_a_10_mb_body_gets_413_from_a_real_server(door: dict[str, Any]) -> None:
    port = free_port()
    server = serve_http_in_thread(door["app"], "127.0.0.1", port)
    try:
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        body = b'{"apiVersion": "fleetplane/v1", "pad": "' + b"A" * 10_000_000 + b'"}'
        headers = {**door["team"], "Content-Type": "application/json"}
        # urllib writes the whole body before reading the answer: a server that answers and
        # closes without reading the body resets that connection (BrokenPipe / ECONNRESET)
        for _ in range(3):  # not a lucky race: every time
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/tasks", data=body,
                                         headers=headers, method="POST")
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=60)
            assert info.value.code == 413
            assert json.loads(info.value.read())["errors"][0]["field"] == "body"
        with httpx.Client(timeout=60) as http:
            r = http.post(f"http://127.0.0.1:{port}/v1/tasks", content=body, headers=headers)
            assert r.status_code == 413, r.text

            def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
                for _ in range(10):
                    yield b"B" * 1_000_000

            r = http.post(f"http://127.0.0.1:{port}/v1/tasks", content=chunks(),
                          headers=headers)
            assert r.status_code == 413
            # the server is fine afterwards
            assert http.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        server.should_exit = True


def test_a_registered_repository_is_checked_out_and_edited(tmp_path: Path) -> None:
    bare = bare_repository(tmp_path)
    registry = RepositoryRegistry()
    registry.apply("payments-core", {"name": "payments-core", "location": str(bare),
                                     "kind": "path"})
    registry.apply("by-url", {"name": "by-url", "location": f"file://{bare}", "kind": "url"})
    ws = Workspaces({}, tmp_path / "worktrees",
                    lookup=CheckoutResolver(registry, tmp_path / "clones"))
    for name in ("payments-core", "by-url"):
        wt = ws.create(name, f"task-{name}", 1, "main")
        (wt.path / "src" / "iban" / "checksum.py").write_text("def valid() -> bool: ...\n")
        done = ws.commit(wt, f"task-{name}", 1, "add checksum")
        assert done.sha and [f.path for f in done.files] == ["src/iban/checksum.py"]
        ws.remove(wt)
    branches = git(f"--git-dir={bare}", "branch", "--list", "fleetplane/*")
    assert "fleetplane/task-payments-core/attempt-1" in branches
    assert (tmp_path / "clones" / "by-url.git" / "HEAD").exists()
    with pytest.raises(WorkspaceConfigError, match="not registered"):
        ws.create("unknown", "t", 1, "main")
    with pytest.raises(WorkspaceConfigError, match="ref"):
        ws.create("payments-core", "t-ref", 1, "no-such-branch")
    registry.apply("payments-core", None)  # unregistered: the executor stops using it
    with pytest.raises(WorkspaceConfigError):
        ws.create("payments-core", "t-gone", 1, "main")


def test_raw_submissions_with_each_fault_are_rejected_to_the_dlq(
        base_settings: Settings, unique: str, producer: EventProducer) -> None:
    """The ingest validator as ingest.main wires it (registered repositories from the
    registry), on tasks.submitted: each fault becomes a TaskRejected naming the field and a
    fleet.dlq record with the reason; the valid record on a registered repository is accepted."""
    registry = RepositoryRegistry()
    registry.apply("raw-repo", {"name": "raw-repo", "location": "/srv/raw", "kind": "path"})
    validate = partial(accept, known_repository=registry.known)

    def handler(event: ev.Event, record: Record) -> list[ev.Event]:
        if not event.task_id.startswith(unique):
            return []  # the session broker's tasks.submitted holds other tests' records
        return list(validate(event, record))

    cases = {"tool": ({"allowed_tools": ["sudo"]}, "spec.allowed_tools"),
             "repo": ({"repository": "../../etc"}, "spec.repository"),
             "ref": ({"repository": "raw-repo", "ref": "--output=/tmp/x"}, "spec.ref"),
             "self": ({"depends_on": [f"{unique}-self"]}, "spec.depends_on")}
    events = [ev.TaskSubmitted(task_id=f"{unique}-{k}", team="raw", source="kafka",
                               spec=ev.TaskSpec(name=f"n-{k}", task_type="codegen", prompt="p",
                                                **spec))  # type: ignore[arg-type]
              for k, (spec, _) in cases.items()]
    good = ev.TaskSubmitted(task_id=f"{unique}-good", team="raw", source="kafka",
                            spec=ev.TaskSpec(name="n-good", task_type="codegen", prompt="p",
                                             repository="raw-repo", ref="release/1"))
    processor = Processor(f"raw-{unique}", [SUBMITTED], handler, base_settings,
                          group_id=f"raw-{unique}")
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    try:
        producer.send([*events, good])
        serde = default_serde()
        dlq = [serde.decode(v) for _, v, _ in read_all(base_settings, DLQ, len(cases),
                                                        match=unique)]
        dead = {d.task_id: d for d in dlq if isinstance(d, ev.DeadLetter)}
        rejected = {e.task_id: e for e in (serde.decode(v) for _, v, _ in read_all(
            base_settings, LIFECYCLE, len(cases), match=unique))
            if isinstance(e, ev.TaskRejected)}
        for key, (_, field) in cases.items():
            task_id = f"{unique}-{key}"
            assert dead[task_id].reason.startswith(field), dead[task_id].reason
            assert rejected[task_id].field == field
        accepted = [serde.decode(v) for _, v, _ in read_all(base_settings, ACCEPTED, 1,
                                                             match=f"{unique}-good")]
        assert [e.task_id for e in accepted if isinstance(e, ev.TaskAccepted)] == [good.task_id]
    finally:
        processor.stop()
        thread.join(15)
