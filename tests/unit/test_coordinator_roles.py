"""The coordinator's pieces that need no broker: when a standby takes over (Liveness), what the
repartition forwards, and how a scheduler record's dead letter names its original source."""

from __future__ import annotations

from collections import deque

import pytest

from fleetplane.coordinator.liveness import Liveness
from fleetplane.coordinator.repartition import repartition, source_record
from fleetplane.coordinator.topology import (
    SCHEDULER_TOPIC,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
)
from fleetplane.core import events as ev
from fleetplane.core.errors import NotRetriable
from fleetplane.core.loop import RawRecord, Record
from fleetplane.core.serde import default_serde


def test_liveness_takes_over_after_enough_quiet_looks_spread_over_the_timeout() -> None:
    s = Liveness(3.0, now=0.0)
    assert not s.observe((5, 7, 4), 0.0)
    looks = [0.25 * i for i in range(1, 13)]  # 0.25 .. 3.0
    decided = [s.observe((5, 7, 4), t) for t in looks]
    assert decided[:-1] == [False] * 11 and decided[-1]  # 3 s without progress: gone


def test_liveness_any_progress_mark_restarts_the_wait() -> None:
    s = Liveness(3.0, now=0.0)
    s.observe((5, 7, 4), 0.0)
    assert not s.observe((5, 7, 4), 2.9)
    assert not s.observe((5, 7, 5), 3.0)  # only a commit of the schedule step moved
    for t in (3.5, 4.0, 4.5, 5.0, 5.5):
        assert not s.observe((5, 7, 5), t)
    assert not s.observe((5, 8, 5), 5.9)  # only the changelog moved
    assert not s.observe((6, 8, 5), 6.0)  # only a tick


def test_liveness_one_late_look_after_a_stall_of_the_standby_is_not_silence() -> None:
    """The standby starved of CPU for 10 s looks once: not enough to decide (the arrival-time
    judgement took over from a live active there); the active's progress meanwhile would have
    moved the marks, and a dead one is found out after the looks that follow."""
    s = Liveness(3.0, now=0.0)
    s.observe((5, 7, 4), 0.0)
    assert not s.observe((5, 7, 4), 10.0)  # one look, 10 s late
    assert not s.observe((5, 7, 4), 10.3)
    assert not s.observe((5, 7, 4), 10.6)
    # four quiet looks, but spread over 0.9 s only: the timeout's half is 1.5 s
    assert not s.observe((5, 7, 4), 10.9)
    assert s.observe((5, 7, 4), 11.6)


def test_liveness_no_answer_is_no_evidence() -> None:
    s = Liveness(3.0, now=0.0)
    s.observe((5, 7, 4), 0.0)
    for t in (0.5, 1.0, 1.5, 2.0, 2.5):
        assert not s.observe((5, 7, 4), t)
    s.reset(2.9)  # the broker did not answer: wait again
    for t in (3.2, 3.7, 4.2, 4.7, 5.2, 5.7):
        assert not s.observe((5, 7, 4), t)
    assert s.observe((5, 7, 4), 5.9)


def test_liveness_timeout_grows_with_the_gaps_seen_on_a_loaded_machine() -> None:
    s = Liveness(3.0, now=0.0)
    t, mark = 0.0, 0
    for _ in range(20):  # the active's progress shows every 2 s (load), looks every 0.5 s:
        s.observe((mark, 0, 0), t)  # each gap is proven by the looks at +0.5 .. +1.5 s
        for quiet in (0.5, 1.0, 1.5):
            assert not s.observe((mark, 0, 0), t + quiet)
        t += 2.0
        mark += 1
    assert s.timeout() == 6.0  # 4 x the 1.5 s proven
    # it dies after its last progress (at t - 2): silent looks go on until 6 s after it
    looks = [t + 0.5 * i for i in range(9)]  # 2.0 .. 6.0 s of silence
    decided = [s.observe((mark - 1, 0, 0), x) for x in looks]
    assert decided[:-1] == [False] * 8 and decided[-1]
    assert Liveness(3.0, now=0.0, gaps=deque([100.0])).timeout() == 60.0  # capped


def test_liveness_a_standby_that_looks_late_does_not_lengthen_its_timeout() -> None:
    """The standby's own stalls (starved of CPU, it looks every 3 s) prove no gap of the
    active, whose marks moved at every look: the timeout stays the configured one."""
    s = Liveness(3.0, now=0.0)
    for i in range(20):
        s.observe((i, 0, 0), 3.0 * i)
    assert s.timeout() == 3.0


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
