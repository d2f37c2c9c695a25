import pytest
from pydantic import ValidationError

from fleetplane.core import events as ev
from fleetplane.core.loop import Rejected
from fleetplane.ingest.handlers import accept
from fleetplane.ingest.manifest import TaskManifest


def manifest(**spec: object) -> dict[str, object]:
    s: dict[str, object] = {"taskType": "codegen", "prompt": "write it",
                            "writeScope": ["src/**"]}
    s.update(spec)
    return {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
            "metadata": {"name": "gen-1", "team": "payments"}, "spec": s}


def test_manifest_maps_to_task_spec() -> None:
    m = TaskManifest.model_validate(manifest(
        model={"preference": "tier", "tier": "small"},
        limits={"maxCostUsd": 0.5, "maxTurns": 4}, workspace={"repository": "shop"}))
    spec = m.to_spec()
    assert (spec.name, spec.task_type, spec.tier, spec.max_cost_usd, spec.max_turns,
            spec.repository, spec.write_scope) == (
        "gen-1", "codegen", "small", 0.5, 4, "shop", ["src/**"])


@pytest.mark.parametrize("bad, field", [
    ({"prompt": ""}, ("spec", "prompt")),
    ({"surprise": 1}, ("spec", "surprise")),
    ({"writeScope": ["../etc/**"]}, ("spec", "writeScope")),
    ({"writeScope": ["/abs/path"]}, ("spec", "writeScope")),
    ({"priority": "urgent"}, ("spec", "priority")),
    ({"taskType": "Bad Type!"}, ("spec", "taskType")),
])
def test_invalid_manifests_name_the_field(bad: dict[str, object], field: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        TaskManifest.model_validate(manifest(**bad))
    assert any(tuple(e["loc"][:2]) == field for e in info.value.errors()), info.value.errors()


def submitted(team: str = "payments", **spec: object) -> ev.TaskSubmitted:
    base: dict[str, object] = {"name": "n", "task_type": "codegen", "prompt": "p"}
    base.update(spec)
    return ev.TaskSubmitted(task_id="t1", team=team, spec=ev.TaskSpec(**base))  # type: ignore[arg-type]


def test_valid_raw_submission_is_accepted() -> None:
    (out,) = accept(submitted())
    assert isinstance(out, ev.TaskAccepted) and out.task_id == "t1" and out.spec.prompt == "p"


@pytest.mark.parametrize("kwargs, field", [
    ({"team": "Not A Team"}, "team"),
    ({"prompt": ""}, "spec.prompt"),
    ({"failure_policy": "pray"}, "spec.failure_policy"),
    ({"write_scope": ["../../x"]}, "spec.write_scope"),
    ({"max_attempts": 0}, "spec.max_attempts"),
    ({"model_preference": "pinned"}, "spec.model"),
])
def test_invalid_raw_submission_is_rejected_with_field(kwargs: dict[str, object],
                                                       field: str) -> None:
    with pytest.raises(Rejected) as info:
        accept(submitted(**kwargs))
    (rejected,) = info.value.emit
    assert isinstance(rejected, ev.TaskRejected) and rejected.field == field
    assert field in str(info.value)


def test_other_event_types_on_the_submission_topic_are_rejected() -> None:
    with pytest.raises(Rejected, match="TaskSubmitted"):
        accept(ev.TaskHeld(task_id="t", team="a", reason="x"))
