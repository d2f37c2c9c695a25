"""The coordinator's pieces that need no broker: when a standby takes over (Silence), what the
repartition forwards, and how a scheduler record's dead letter names its original source."""

from __future__ import annotations

import pytest

from fleetplane.coordinator.app import (
    SCHEDULER_TOPIC,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    Silence,
    repartition,
    source_record,
)
from fleetplane.core import events as ev
from fleetplane.core.errors import NotRetriable
from fleetplane.core.loop import RawRecord, Record
from fleetplane.core.serde import default_serde


def test_silence_takes_over_only_after_takeover_s_without_new_records() -> None:
    s = Silence(3.0, now=0.0)
    assert not s.observe(-1, 1.0)
    assert not s.observe(-1, 2.9)
    assert s.observe(-1, 3.0)  # nothing ever read for 3 s: the active is gone


def test_silence_restarts_the_wait_on_every_new_record_and_on_errors() -> None:
    s = Silence(3.0, now=0.0)
    assert not s.observe(10, 2.0)  # a tick arrived: the active is alive
    assert not s.observe(10, 4.9)
    assert not s.observe(11, 5.0)
    assert not s.observe(11, 7.9)
    s.reset(7.9)  # the broker did not answer: no evidence, wait again
    assert not s.observe(11, 10.8)
    assert s.observe(11, 10.9)


def _record(event: ev.Event, key: bytes, topic: str = "tasks.routed") -> Record:
    return Record(topic=topic, partition=3, offset=41, key=key,
                  value=default_serde().encode(event), headers={"team": b"t"})


def test_repartition_forwards_the_record_unchanged_with_its_source() -> None:
    routed = ev.TaskRouted(task_id="a", team="t", attempt=1, model="m", provider="p",
                           tier="standard", reason="r",
                           spec=ev.TaskSpec(name="n", task_type="x", prompt="p"))
    rec = _record(routed, b"a")
    [out] = repartition(routed, rec)
    assert isinstance(out, RawRecord)
    assert (out.topic, out.partition, out.key, out.value) == (SCHEDULER_TOPIC, 0, b"a",
                                                              rec.value)
    headers = dict(out.headers)
    assert headers["team"] == b"t"
    assert (headers[SOURCE_TOPIC], headers[SOURCE_PARTITION], headers[SOURCE_OFFSET]) == (
        b"tasks.routed", b"3", b"41")
    # the scheduler's dead letters name the record as it was read before the repartition
    back = source_record(Record(topic=SCHEDULER_TOPIC, partition=0, offset=9, key=out.key,
                                value=out.value or b"", headers=headers))
    assert (back.topic, back.partition, back.offset, back.headers) == (
        "tasks.routed", 3, 41, {"team": b"t"})


def test_repartition_rejects_a_key_that_is_not_the_task_id_but_not_a_team_key() -> None:
    cmd = ev.ControlCommand(task_id="a", team="t", command="cancel")
    with pytest.raises(NotRetriable, match="is not the task id"):
        repartition(cmd, _record(cmd, b"b", topic="fleet.control"))
    budget = ev.BudgetStatus(task_id="", team="t", period="2026-12", spent_usd=1.0,
                             budget_usd=2.0, remaining_usd=1.0, state="ok")
    [out] = repartition(budget, _record(budget, b"t", topic="fleet.budget"))
    assert isinstance(out, RawRecord) and out.key == b"t"
