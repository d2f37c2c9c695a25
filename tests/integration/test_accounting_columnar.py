"""The sink's fast path (accounting/columnar.py) builds the rows rows_for builds, from the Avro
bytes, for every event type it takes; what it cannot store goes to the usual path."""

from __future__ import annotations

from typing import Any

import pytest

from fleetplane.accounting import columnar, rows
from fleetplane.core import events as ev
from fleetplane.core.loop import Record
from fleetplane.core.serde import default_serde
from tests.integration.test_accounting_rows import mk, samples

TOPIC, PARTITION, OFFSET = "tasks.lifecycle", 3, 41


def fast_rows(event: ev.Event) -> dict[str, list[rows.Row]]:
    value = default_serde().encode(event)
    name, fields = default_serde().decode_record(value)
    event_row, fact, transition = columnar.rows_of(name, fields, TOPIC, PARTITION, OFFSET, value)
    out: dict[str, list[rows.Row]] = {rows.EVENTS: [event_row]}
    if fact is not None:
        out[fact[0]] = [fact[1]]
    if transition is not None:
        out[rows.TASK_TRANSITIONS] = [transition]
    return out


def usual_rows(event: ev.Event) -> dict[str, list[rows.Row]]:
    value = default_serde().encode(event)
    decoded = default_serde().decode(value)   # what the loop hands the handler
    return rows.rows_for(decoded, Record(TOPIC, PARTITION, OFFSET, None, value))


@pytest.mark.parametrize("event", [e for e in samples() if type(e).__name__ in columnar.FAST],
                         ids=lambda e: type(e).__name__)
def test_fast_rows_equal_the_usual_rows(event: ev.Event) -> None:
    assert fast_rows(event) == usual_rows(event)


def test_every_event_type_but_dead_letters_takes_the_fast_path() -> None:
    assert set(ev.EVENT_TYPES) - {"DeadLetter"} == columnar.FAST


@pytest.mark.parametrize("fields", [
    {"error": "overloaded", "stop_reason": None, "causation_id": "c-1", "cost_usd": 1e-7},
    {"error": None, "stop_reason": "end_turn", "cost_usd": 12345.678901, "latency_ms": 0.1},
])
def test_optional_fields_and_odd_floats_match(fields: dict[str, Any]) -> None:
    base: dict[str, Any] = {"attempt": 1, "call_index": 2, "model": "m", "provider": "p",
                            "tier": "small", "input_tokens": 3, "output_tokens": 4,
                            "cost_usd": 0.1, "latency_ms": 5.5, "outcome": "ok"}
    event = mk(ev.ModelCall, **{**base, **fields})
    assert fast_rows(event) == usual_rows(event)


def test_unicode_text_and_nested_specs_give_the_same_payload() -> None:
    spec = ev.TaskSpec(name="ünï ✓", task_type="review", prompt='say "hi"\n\t\\ 日本',
                       labels={"k": "v"}, write_scope=["a/*"], max_cost_usd=0.3)
    event = mk(ev.TaskSubmitted, spec=spec, idempotency_key="k")
    assert fast_rows(event) == usual_rows(event)


def test_a_batch_with_an_unstorable_value_is_refused_as_a_whole() -> None:
    good = usual_rows(mk(ev.ModelCall, attempt=1, call_index=0, model="m", provider="p",
                         tier="small", input_tokens=1, output_tokens=1, cost_usd=0.1,
                         latency_ms=1.0, outcome="ok"))
    bad = usual_rows(mk(ev.ModelCall, attempt=1, call_index=1, model="m", provider="p",
                        tier="small", input_tokens=1, output_tokens=1,
                        cost_usd=float("nan"), latency_ms=1.0, outcome="ok"))
    negative = usual_rows(mk(ev.TaskCompleted, attempt=-1, model="m", output="o",
                             cost_usd=0.1, duration_ms=1))

    def table(*parts: dict[str, list[rows.Row]]) -> dict[str, list[rows.Row]]:
        out: dict[str, list[rows.Row]] = {t: [] for t in rows.COLUMNS}
        for part in parts:
            for t, r in part.items():
                out[t].extend(r)
        return out

    assert columnar.storable(table(good))
    assert not columnar.storable(table(good, bad))
    assert not columnar.storable(table(good, negative))
