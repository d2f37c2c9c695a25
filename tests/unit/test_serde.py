import io
import json
from pathlib import Path

import fastavro
import pytest
from fastavro import schemaless_reader
from pydantic import ValidationError

from fleetplane.core import events as ev
from fleetplane.core.schemas import load_schema_set
from fleetplane.core.serde import MAGIC, DecodeError, Serde, default_serde


def spec() -> ev.TaskSpec:
    return ev.TaskSpec(name="n", task_type="summarize", prompt="hello", write_scope=["src/**"])


def test_round_trip_every_event_type_keeps_every_field() -> None:
    serde = default_serde()
    samples: list[ev.Event] = [
        ev.TaskSubmitted(task_id="t", team="a", spec=spec(), idempotency_key="k"),
        ev.TaskRouted(task_id="t", team="a", spec=spec(), attempt=2, model="m", provider="p",
                      tier="small", reason="r", alternatives=["x"], estimated_cost_usd=0.5),
        ev.WorkspaceChange(task_id="t", team="a", attempt=1, repository="r", branch="b",
                           files=[ev.FileChange(path="f", added=3, removed=1)]),
        ev.DeadLetter(task_id="", team="", service="s", source_topic="x", source_partition=1,
                      source_offset=7, key=None, payload=b"\x00\xff", headers={"h": b"v"},
                      error_class="E", reason="bad"),
        ev.Alert(task_id="", team="a", severity="warning", kind="cost", message="m", value=1.5),
    ]
    for event in samples:
        data = serde.encode(event)
        assert data[:2] == MAGIC
        assert serde.decode(data) == event


def test_single_object_header_carries_the_schema_fingerprint() -> None:
    serde = default_serde()
    data = serde.encode(ev.TaskHeld(task_id="t", team="a", reason="quota"))
    entry = serde.schemas.current["TaskHeld"]
    assert data[2:10] == entry.fingerprint
    # The body is plain Avro binary: any Avro reader with the schema decodes it.
    body = schemaless_reader(io.BytesIO(data[10:]), entry.parsed, None)
    assert isinstance(body, dict) and body["reason"] == "quota"


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "single-object"),
        (b"{\"task_id\": 1}", "single-object"),
        (MAGIC + b"\x00" * 8 + b"abc", "unknown schema fingerprint"),
    ],
)
def test_garbage_is_a_decode_error_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        default_serde().decode(payload)


def test_truncated_body_is_a_decode_error() -> None:
    serde = default_serde()
    data = serde.encode(ev.TaskSubmitted(task_id="t", team="a", spec=spec()))
    with pytest.raises(DecodeError):
        serde.decode(data[:30])


def _write_schema_dir(tmp: Path, fields_extra: list[dict[str, object]]) -> Path:
    """A copy of schemas/ in which TaskHeld has extra fields."""
    src = Path(__file__).resolve().parents[2] / "schemas"
    (tmp / "types").mkdir(parents=True)
    for p in (src / "types").glob("*.avsc"):
        (tmp / "types" / p.name).write_text(p.read_text())
    for p in src.glob("*.avsc"):
        raw = json.loads(p.read_text())
        if raw["name"] == "TaskHeld":
            raw["fields"] = raw["fields"] + fields_extra
        (tmp / p.name).write_text(json.dumps(raw))
    return tmp


def test_evolution_new_reader_decodes_old_writer_and_old_reader_decodes_new(
    tmp_path: Path,
) -> None:
    """A field added with a default: both directions decode (writer schema from the fingerprint)."""
    added = {"name": "queue_position", "type": "int", "default": -1, "doc": "added in v2"}
    old_dir = Path(__file__).resolve().parents[2] / "schemas"
    new_dir = _write_schema_dir(tmp_path / "new", [added])
    old_set = load_schema_set(old_dir)
    new_set = load_schema_set(new_dir)

    # Each side knows the other's fingerprint as history (as schemas/history/ would hold it).
    old_entry = old_set.current["TaskHeld"]
    new_entry = new_set.current["TaskHeld"]
    old_set.by_fingerprint[new_entry.fingerprint] = new_entry
    new_set.by_fingerprint[old_entry.fingerprint] = old_entry
    old_serde, new_serde = Serde(old_set), Serde(new_set)

    old_bytes = old_serde.encode(ev.TaskHeld(task_id="t", team="a", reason="quota"))
    name, record = new_serde.decode_record(old_bytes)
    assert name == "TaskHeld" and record["queue_position"] == -1 and record["reason"] == "quota"

    buf = io.BytesIO()
    buf.write(MAGIC + new_entry.fingerprint)
    new_record = {**record, "queue_position": 4, "reason": "conflict"}
    fastavro.schemaless_writer(buf, new_entry.parsed, new_record)
    event = old_serde.decode(buf.getvalue())
    assert isinstance(event, ev.TaskHeld) and event.reason == "conflict"
    assert "queue_position" not in event.model_dump()


def test_decode_without_validation_builds_the_same_events_as_validation() -> None:
    """decode() builds events from Avro's fields without pydantic's second validation
    (events.trusted); every field, nested record and default is what validation gives."""
    serde = default_serde()
    samples: list[ev.Event] = [
        ev.TaskAccepted(task_id="t", team="a", spec=spec()),
        ev.TaskRouted(task_id="t", team="a", spec=spec(), attempt=2, model="m", provider="p",
                      tier="small", reason="r", alternatives=["x"], estimated_cost_usd=0.5),
        ev.WorkspaceChange(task_id="t", team="a", attempt=1, repository="r", branch="b",
                           files=[ev.FileChange(path="f", added=3, removed=1)]),
        ev.TaskHeld(task_id="t", team="a", reason="quota"),
        ev.DeadLetter(task_id="", team="", service="s", source_topic="x", source_partition=1,
                      source_offset=7, key=b"k", payload=b"\x00", headers={"h": b"v"},
                      error_class="E", reason="bad"),
    ]
    for event in samples:
        data = serde.encode(event)
        fast, slow = serde.decode(data), serde.decode_validated(data)
        assert fast == slow == event
        assert fast.model_dump() == slow.model_dump()
        assert serde.encode(fast) == data
        assert type(fast) is type(event)
        for name, value in fast:
            assert type(value) is type(getattr(slow, name)), name
        with pytest.raises(ValidationError):
            fast.task_id = "other"  # type: ignore[misc]  # still frozen
    routed = serde.decode(serde.encode(samples[1]))
    assert isinstance(routed, ev.TaskRouted) and isinstance(routed.spec, ev.TaskSpec)
    assert routed.derive(ev.TaskHeld, reason="x").causation_id == routed.event_id


def test_an_older_record_gets_the_current_schema_defaults_without_validation() -> None:
    """A record with fewer fields than the model (model_construct path) gets the defaults."""
    made = ev.trusted(ev.TaskHeld, {"task_id": "t", "team": "a", "reason": "r"})
    assert made == ev.TaskHeld(task_id="t", team="a", reason="r", event_id=made.event_id,
                               occurred_at=made.occurred_at)
    assert made.paths == [] and made.attempt == 0
