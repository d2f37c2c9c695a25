"""Dependencies by name (ingest.names): the index, the resolution rules, and the raw-Kafka
validator resolving names to ids or refusing an ambiguous name."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from fleetplane.core import events as ev
from fleetplane.core.loop import RawRecord, Rejected
from fleetplane.ingest import idempotency as idempotency_module
from fleetplane.ingest import names as names_module
from fleetplane.ingest.handlers import accept
from fleetplane.ingest.idempotency import IDEMPOTENCY_TOPIC, MarkingHandler, Marks
from fleetplane.ingest.names import NAMES_TOPIC, NameIndex, name_key, name_record, resolve


def index_with(*tasks: tuple[str, str, str]) -> NameIndex:
    names = NameIndex(3600)
    for team, name, task_id in tasks:
        names.apply(name_key(team, task_id), name_record(team, name, task_id))
    return names


def test_resolution_order_batch_then_id_then_unique_name() -> None:
    names = index_with(("a", "build", "id-1"), ("a", "lint", "id-2"), ("a", "lint", "id-3"),
                       ("b", "build", "id-9"))
    ids, problems = resolve("a", ["build", "id-2", "fresh"], names, batch={"fresh": "id-new"})
    assert (ids, problems) == (["id-1", "id-2", "id-new"], [])
    _, problems = resolve("a", ["build", "lint", "nothing", "id-9"], names)
    assert [p.index for p in problems] == [1, 2, 3]
    assert "names 2 tasks" in problems[0].reason and "id-3" in problems[0].reason
    assert "names no task of team a" in problems[1].reason
    # another team's id is not this team's dependency, whatever the mode
    assert resolve("a", ["id-9"], names, strict=False)[1][0].index == 0
    # the task history answers for ids the index does not hold; lenient mode keeps unknowns
    assert resolve("a", ["old-id"], names, known_id=lambda t: t == "old-id") == (["old-id"], [])
    assert resolve("a", ["raw-id"], names, strict=False) == (["raw-id"], [])
    assert resolve("a", ["dup"], names, batch={"dup": None})[1][0].reason.startswith("'dup'")


def test_names_leave_the_index_with_tombstones_and_age() -> None:
    names = index_with(("a", "build", "id-1"))
    names.apply(name_key("a", "id-1"), None)
    assert names.ids_named("a", "build") == [] and names.team_of("id-1") is None
    names.add("a", "build", "id-old", at=time.time() - 7200)
    assert names.ids_named("a", "build") == []


def raw(task_id: str, name: str, deps: list[str], key: str | None = None) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(task_id=task_id, team="a", idempotency_key=key, spec=ev.TaskSpec(
        name=name, task_type="codegen", prompt="p", depends_on=deps))


def test_the_raw_path_resolves_names_and_refuses_an_ambiguous_one() -> None:
    names = index_with(("a", "build", "id-1"), ("a", "lint", "id-2"), ("a", "lint", "id-3"))
    (out,) = accept(raw("t1", "deploy", ["build", "someone-elses-id"]), names=names)
    assert isinstance(out, ev.TaskAccepted)
    assert out.spec.depends_on == ["id-1", "someone-elses-id"]
    with pytest.raises(Rejected) as info:
        accept(raw("t2", "deploy", ["lint"]), names=names)
    (rejected,) = info.value.emit
    assert isinstance(rejected, ev.TaskRejected) and rejected.field == "spec.depends_on"


def test_accepted_tasks_publish_their_name_and_mark_with_the_acceptance() -> None:
    """The mark and the name are outputs of the validating step (same transaction as the
    acceptance), and this replica's tables know them at once."""
    names, marks = NameIndex(3600), Marks(3600)
    handler = MarkingHandler(lambda e, r, seen: accept(e, r, seen, names=names), marks, names)
    out = handler(raw("t1", "build", [], key="k1"), None)  # type: ignore[arg-type]
    topics = sorted(o.topic for o in out if isinstance(o, RawRecord))
    assert topics == sorted([IDEMPOTENCY_TOPIC, NAMES_TOPIC])
    assert [type(o) for o in out if not isinstance(o, RawRecord)] == [ev.TaskAccepted]
    assert names.ids_named("a", "build") == ["t1"] and marks.get("a", "k1") is not None
    (dependent,) = handler(raw("t2", "deploy", ["build"]), None)[1:]  # type: ignore[arg-type]
    assert isinstance(dependent, ev.TaskAccepted) and dependent.spec.depends_on == ["t1"]


def test_names_and_marks_older_than_their_window_leave_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica that has run for weeks holds its windows, not every name and idempotency mark
    it has seen since it started (they grew by one entry per task before stop 29). The
    modules' clock is the test's: a real 0.3 s window was outlasted by the 1,000 additions on
    a loaded machine."""
    clock = SimpleNamespace(now=1_000_000.0)
    fake_time = SimpleNamespace(time=lambda: clock.now)
    monkeypatch.setattr(names_module, "time", fake_time)
    monkeypatch.setattr(idempotency_module, "time", fake_time)
    names, marks = NameIndex(300), Marks(300)
    for i in range(1000):
        names.add("a", f"job-{i}", f"id-{i}")
        marks.apply(f"a/key-{i}", {"task_id": f"t-{i}", "event_id": "e", "spec_sha256": "s",
                                   "at": clock.now})
    names.add("a", "job-0", "renamed-0", at=clock.now + 200)  # job-0 again, later
    assert len(names) == 1001 and len(marks) == 1000
    clock.now += 350
    names.add("a", "fresh", "new-1")  # new entries push the expired ones out
    marks.apply("a/key-5", {"task_id": "t-5", "event_id": "e", "spec_sha256": "s",
                            "at": clock.now})
    assert len(names) == 2 and names.team_of("id-5") is None
    assert names.ids_named("a", "job-0") == ["renamed-0"]
    assert len(marks) == 1 and marks.get("a", "key-5") is not None
    names.add("a", "late", "old-7", at=clock.now - 301)  # already outside the window
    assert names.team_of("old-7") is None
