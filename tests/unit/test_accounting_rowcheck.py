"""Rows ClickHouse cannot hold are refused per event (dead-lettered by the loop) instead of
failing a whole insert batch (which stopped accounting on every restart: found by bench/fuzz.py)."""

from __future__ import annotations

import math

import pytest

from fleetplane.accounting.rowcheck import Unstorable, check
from fleetplane.accounting.rows import rows_for
from fleetplane.core import events as ev
from fleetplane.core.loop import Record

REC = Record(topic="tasks.outcomes", partition=0, offset=7, key=b"t", value=b"")


def completed(**fields: object) -> ev.TaskCompleted:
    base: dict[str, object] = {"task_id": "t", "team": "a", "attempt": 1, "model": "m",
                               "output": "o", "cost_usd": 0.25, "duration_ms": 10}
    return ev.TaskCompleted.model_validate({**base, **fields})


def test_a_sound_event_passes() -> None:
    check(rows_for(completed(), REC))


@pytest.mark.parametrize(("fields", "needle"), [
    ({"attempt": -1}, "attempt=-1 is outside UInt32"),
    ({"attempt": 2**32}, "outside UInt32"),
    ({"cost_usd": math.nan}, "cost_usd=nan is not a finite number"),
    ({"cost_usd": math.inf}, "not a finite number"),
    ({"cost_usd": -0.5}, "cost_usd=-0.5 is negative"),
    ({"audit_count": -3}, "audit_count=-3 is outside UInt32"),
])
def test_values_no_column_can_hold_are_refused_with_the_column(
        fields: dict[str, object], needle: str) -> None:
    with pytest.raises(Unstorable, match=needle.replace("(", r"\(")):
        check(rows_for(completed(**fields), REC))


def test_model_calls_with_negative_tokens_are_refused() -> None:
    call = ev.ModelCall(task_id="t", team="a", attempt=1, call_index=0, model="m", provider="p",
                        tier="small", input_tokens=-5, output_tokens=1, cost_usd=0.0,
                        latency_ms=1.0, outcome="ok")
    with pytest.raises(Unstorable, match="input_tokens=-5 is outside UInt64"):
        check(rows_for(call, REC))
