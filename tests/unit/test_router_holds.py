"""Budget holds as records on router.holds (fleetplane.router.holds): a record per held task in
the transaction that holds it, a tombstone in the one that routes or ends it, taken again after
an aborted transaction; a router restored from the records releases the tasks as the one that
held them would."""

from __future__ import annotations

import json

from fleetplane.core import events as ev
from fleetplane.core.loop import RawRecord
from fleetplane.router import holds
from fleetplane.router.handlers import Router

from .test_router import accepted, budget, complete, router


def table(records: list[RawRecord]) -> dict[str, dict[str, object] | None]:
    """The topic as compaction leaves it: the latest value per task id."""
    latest: dict[str, dict[str, object] | None] = {}
    for r in records:
        assert r.topic == holds.HOLDS_TOPIC and r.key is not None
        latest[r.key.decode()] = json.loads(r.value) if r.value is not None else None
    return latest


def held_router() -> Router:
    rt = router()
    rt.handle(budget("a", remaining=0.0))
    rt.handle(accepted("h1", task_type="codegen"))
    rt.handle(accepted("h2", task_type="review"))
    rt.handle(accepted("free", team="b"))  # routed, never held: no record
    return rt


def test_a_hold_is_a_record_and_its_release_a_tombstone() -> None:
    rt = held_router()
    first = rt.commit_records()
    assert set(table(first)) == {"h1", "h2"}
    h1 = table(first)["h1"]
    assert h1 is not None and h1["team"] == "a" and h1["attempt"] == 1
    assert h1["spec"] == accepted("h1", task_type="codegen").spec.model_dump(mode="json")
    assert rt.commit_records() == []  # nothing changed since
    rt.handle(ev.TaskCancelled(task_id="h2", team="a", reason="no longer needed"))
    assert table(rt.commit_records()) == {"h2": None}
    released = rt.handle(budget("a", remaining=50.0))
    assert [(o.task_id, type(o).__name__) for o in released] == [("h1", "TaskRouted")]
    assert table(rt.commit_records()) == {"h1": None}


def test_an_aborted_transaction_writes_its_holds_again() -> None:
    rt = held_router()
    lost = rt.commit_records()
    rt.on_abort()  # the transaction carrying them was aborted
    assert table(rt.commit_records()) == table(lost)
    rt.handle(budget("a", remaining=50.0))  # both released
    ended = rt.commit_records()
    rt.on_abort()
    assert table(rt.commit_records()) == table(ended) == {"h1": None, "h2": None}


def test_a_router_restored_from_the_records_releases_the_held_tasks() -> None:
    rt = held_router()
    rt.handle(ev.TaskEscalated(task_id="h1", team="a", attempt=2, from_tier="small",
                               to_tier="frontier", reason="r"))  # held again, one tier up
    records = table(rt.commit_records())
    fresh = router()
    for value in records.values():
        assert value is not None
        task_id, rec = holds.parse(value)
        assert fresh.state.restore_hold(task_id, rec)
    assert fresh.state.tasks["h1"].held == 2 and fresh.state.tasks["h1"].models == {}
    fresh.handle(budget("a", remaining=0.0))
    status = budget("a", remaining=50.0)
    expected = rt.handle(status)
    got = fresh.handle(status)
    assert [(o.task_id, o.attempt, o.model) for o in got] == [
        (o.task_id, o.attempt, o.model) for o in expected]  # type: ignore[attr-defined]
    assert {o.task_id for o in got} == {"h1", "h2"}
    assert any(getattr(o, "tier", None) == "frontier" for o in got)


def test_a_finished_task_is_not_restored() -> None:
    rt = held_router()
    value = table(rt.commit_records())["h1"]
    assert value is not None
    fresh = router()
    fresh.handle(ev.TaskCancelled(task_id="h1", team="a", reason="r"))
    assert not fresh.state.restore_hold(*holds.parse(value))
    assert "h1" not in fresh.state.tasks


def replica(name: str) -> Router:
    rt = router()
    rt.replica = name
    return rt


def follow(records: list[RawRecord], *routers: Router) -> None:
    """What each replica's follower of router.holds applies."""
    for r in records:
        writer = dict(r.headers)[holds.WRITER_HEADER].decode()
        for rt in routers:
            rt.apply_hold(r.key or b"", r.value, writer, dict(r.headers).get(holds.ROUTED_HEADER))


def test_the_replica_reading_the_budget_releases_a_hold_made_by_another() -> None:
    a, b = replica("a"), replica("b")  # b reads team a's budget status, a its submissions
    b.handle(budget("a", remaining=0.0))
    a.handle(budget("a", remaining=0.0))
    a.handle(accepted("x", task_type="codegen"))
    follow(a.commit_records(), a, b)
    assert b.state.tasks["x"].waiting  # b knows a's hold
    released = b.handle(budget("a", remaining=50.0))
    assert [(o.task_id, type(o).__name__) for o in released] == [("x", "TaskRouted")]
    follow(b.commit_records(), a, b)
    assert not a.state.tasks["x"].waiting  # released elsewhere: no longer held here
    assert a.handle(budget("a", remaining=50.0)) == []  # so not released twice
    assert b.handle(budget("a", remaining=50.0)) == []
    # the outcome reaches a (its partition carries the task): counted for b's model
    model = released[0].model  # type: ignore[attr-defined]
    complete(a, "x")
    assert a.state.stats.get("codegen", model).successes == 1


def test_a_hold_ended_elsewhere_without_a_routing_is_dropped() -> None:
    a, b = replica("a"), replica("b")
    a.handle(budget("a", remaining=0.0))
    a.handle(accepted("x", task_type="codegen"))
    follow(a.commit_records(), a, b)
    b.handle(ev.TaskCancelled(task_id="x", team="a", reason="no longer needed"))
    (end,) = b.commit_records()
    assert end.value is None and holds.ROUTED_HEADER not in dict(end.headers)
    follow([end], a)
    assert "x" not in a.state.tasks


def test_own_records_read_back_change_nothing() -> None:
    a = replica("a")
    a.handle(budget("a", remaining=0.0))
    a.handle(accepted("x", task_type="codegen"))
    records = a.commit_records()
    a.handle(budget("a", remaining=50.0))  # released before its own record is read back
    follow(records, a)
    assert not a.state.tasks["x"].waiting
