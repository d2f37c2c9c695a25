"""Issue 16, "validate at the door, fail fast after it": manifests naming unknown tools,
unregistered repositories, refs that are not git ref names, or themselves as a dependency are
refused with the field (the manifest model for HTTP/CLI/SDK, check_spec/accept for raw Kafka
submissions); permanent failure classes are never retried."""

from __future__ import annotations

import subprocess

import pytest
from pydantic import ValidationError

from fleetplane.coordinator.state import Status
from fleetplane.core import events as ev
from fleetplane.core import failures
from fleetplane.core.loop import Rejected
from fleetplane.executor.tools import SPECS
from fleetplane.ingest.handlers import accept
from fleetplane.ingest.manifest import TOOL_NAMES, TaskManifest, check_spec, ref_problem
from fleetplane.ingest.repositories import RepositoryRegistry, location_problem, record_for
from tests.unit.test_coordinator_scheduler import Harness, kinds

GOOD_REFS = ["main", "HEAD", "v1.2.3", "release/2026-01", "refs/heads/main",
             "feature/x_y", "a" * 40, "HEAD~1"[:4]]
BAD_REFS = ["-x", "--upload-pack=evil", "a..b", "a b", "x.lock", "@", "a@{1}", "a/", "/a",
            "a//b", "a.", ".hidden", "a/.b", "x~1", "x^", "a:b", "a?", "a*", "a[b", "a\\b",
            "a\tb", "a\x7fb"]


def manifest(**spec: object) -> dict[str, object]:
    s: dict[str, object] = {"taskType": "codegen", "prompt": "write it",
                            "writeScope": ["src/**"]}
    s.update(spec)
    return {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
            "metadata": {"name": "gen-1", "team": "payments"}, "spec": s}


def test_tool_names_are_the_executors() -> None:
    assert set(TOOL_NAMES) == set(SPECS)


@pytest.mark.parametrize("ref", GOOD_REFS)
def test_valid_refs_pass(ref: str) -> None:
    assert ref_problem(ref) is None


@pytest.mark.parametrize("ref", BAD_REFS)
def test_invalid_refs_are_named(ref: str) -> None:
    assert ref_problem(ref) is not None


def test_ref_rules_agree_with_git_check_ref_format() -> None:
    for ref in GOOD_REFS + BAD_REFS:
        if ref.startswith("-"):
            continue  # git would read it as an option: refused here on purpose
        ok = subprocess.run(["git", "check-ref-format", "--allow-onelevel", ref],
                            capture_output=True).returncode == 0
        assert ok == (ref_problem(ref) is None), ref


@pytest.mark.parametrize("bad, field", [
    ({"tools": ["read_file", "rm_rf"]}, ("spec", "tools")),
    ({"tools": ["Write_File"]}, ("spec", "tools")),
    ({"workspace": {"repository": "shop", "ref": "-x"}}, ("spec", "workspace", "ref")),
    ({"workspace": {"repository": "shop", "ref": "main..evil"}}, ("spec", "workspace", "ref")),
    ({"workspace": {"repository": "shop", "ref": "a b"}}, ("spec", "workspace", "ref")),
])
def test_manifest_refuses_with_the_field(bad: dict[str, object], field: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        TaskManifest.model_validate(manifest(**bad))
    assert any(tuple(e["loc"][:len(field)]) == field for e in info.value.errors()), \
        info.value.errors()


def submitted(task_id: str = "t-raw-1", **spec: object) -> ev.TaskSubmitted:
    s = ev.TaskSpec(name="gen-1", task_type="codegen", prompt="p", **spec)  # type: ignore[arg-type]
    return ev.TaskSubmitted(task_id=task_id, team="payments", spec=s, source="kafka")


KNOWN = {"shop"}


@pytest.mark.parametrize("spec, field", [
    ({"allowed_tools": ["shell"]}, "spec.allowed_tools"),
    ({"repository": "nope"}, "spec.repository"),
    ({"repository": "../../etc"}, "spec.repository"),
    ({"repository": "/tmp/elsewhere"}, "spec.repository"),
    ({"repository": "shop", "ref": "-c"}, "spec.ref"),
    ({"repository": "shop", "ref": "x..y"}, "spec.ref"),
    ({"depends_on": ["gen-1"]}, "spec.depends_on"),
    ({"depends_on": ["other", "t-raw-1"]}, "spec.depends_on"),
])
def test_raw_submissions_are_rejected_with_the_field(spec: dict[str, object],
                                                     field: str) -> None:
    event = submitted(**spec)
    with pytest.raises(Rejected) as info:
        list(accept(event, known_repository=KNOWN.__contains__))
    (rejected,) = info.value.emit
    assert isinstance(rejected, ev.TaskRejected) and rejected.field == field
    assert str(info.value).startswith(field)
    assert check_spec("payments", event.spec, event.task_id, KNOWN.__contains__)[0] == field  # type: ignore[index]


def test_a_registered_repository_is_accepted() -> None:
    out = list(accept(submitted(repository="shop", ref="release/1"),
                      known_repository=KNOWN.__contains__))
    assert kinds(out) == ["TaskAccepted"]


def test_registry_records_and_locations() -> None:
    reg = RepositoryRegistry()
    reg.apply("shop", record_for("shop", "/srv/git/shop.git"))
    reg.apply("web", record_for("web", "https://git.example.com/web.git"))
    assert reg.known("shop") and reg.known("web") and not reg.known("nope")
    assert reg.get("web")["kind"] == "url"  # type: ignore[index]
    reg.apply("shop", None)
    assert not reg.known("shop") and reg.names() == ["web"]
    for bad in ("", "relative/path", "-oProxyCommand=x", "/a\nb", "ftp:/x"):
        assert location_problem(bad) is not None, bad
    for good in ("/abs", "file:///srv/x.git", "ssh://git@h/x", "git@github.com:o/r.git"):
        assert location_problem(good) is None, good
    with pytest.raises(ValueError, match=r"^name"):
        record_for("Bad Name", "/abs")


@pytest.mark.parametrize("cls", failures.PERMANENT_CLASSES)
@pytest.mark.parametrize("policy", ["retry", "escalate", "hold"])
def test_permanent_failures_are_never_retried(cls: str, policy: str) -> None:
    h = Harness(backoff_base_ms=1)
    h.route("t1", max_attempts=5, failure_policy=policy,
            failure_policies={"tool_error": "retry"})
    out = h.fail("t1", cls)
    assert kinds(out) == ["TaskFailed"], kinds(out)
    assert out[0].final and out[0].failure_class == cls  # type: ignore[attr-defined]
    assert h.state("t1") is Status.FAILED
    assert h.world.tasks["t1"].attempt == 1
