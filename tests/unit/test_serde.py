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


# --- the fast decoder (cavro) against fastavro, the reference reader ---------------------------

FULL_SPEC = ev.TaskSpec(
    name="ünï ✓", task_type="review", prompt='say "hi"\n\t\\ 日本', system_prompt="be brief",
    repository="repo", ref="dev", write_scope=["src/**", "docs/*.md"], depends_on=["t-0"],
    priority="high", model_preference="frontier", tier="frontier", model="m-1",
    allowed_tools=["read", "write"], max_cost_usd=2.5, max_turns=7, timeout_s=60,
    max_attempts=5, temperature=0.7, labels={"env": "prod", "ü": "✓"},
    failure_policies={"timeout": "escalate"}, allowed_commands=["pytest"],
    context_files=["README.md"], parent_task_id="p-1", root_task_id="r-1", depth=2)


def full_samples() -> list[ev.Event]:
    """Every optional field set, non-empty maps and arrays, extreme numbers."""
    t = {"task_id": "t-ü", "team": "a", "causation_id": "c-1"}
    return [
        ev.TaskSubmitted(**t, spec=FULL_SPEC, idempotency_key="k"),
        ev.TaskDispatched(**t, spec=FULL_SPEC, attempt=3, model="m", provider="p", tier="small",
                          leased_paths=["src/a.py"], action="rollback", inputs={"x": "1"}),
        ev.TaskEscalated(**t, attempt=1, from_tier="small", to_tier="frontier", reason="r",
                         spec=FULL_SPEC),
        ev.ModelCall(**t, attempt=2**31 - 1, call_index=-5, model="m", provider="p",
                     tier="small", input_tokens=2**62, output_tokens=0,
                     cache_creation_input_tokens=-1, cache_read_input_tokens=7,
                     cost_usd=1e-12, latency_ms=float("inf"), outcome="error",
                     error="overloaded", stop_reason="max_tokens", prev_hash="ab" * 32),
        ev.DeadLetter(**t, service="s", source_topic="x", source_partition=1, source_offset=2**40,
                      key=b"\x00k", payload=b"\x00\xff" * 100, headers={"h": b"v", "e": b""},
                      error_class="E", reason="bad"),
        ev.Alert(**t, severity="critical", kind="cost", message="m", metric="spend", value=-1.5,
                 baseline=0.0),
        ev.TaskCompleted(**t, attempt=1, model="m", output="x" * 100_000, cost_usd=0.0,
                         duration_ms=2**50, cached=True, audit_head="h", audit_count=3),
        ev.WorkspaceChange(**t, attempt=1, repository="r", branch="b", commit="c0ffee",
                           files=[ev.FileChange(path=f"f{i}", added=i, removed=-i)
                                  for i in range(50)]),
    ]


def _types(value: object) -> object:
    """The value's shape with every leaf's type (and a datetime's time zone)."""
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return (type(value), getattr(value, "tzinfo", None))


def _cases() -> list[ev.Event]:
    from tests.integration.test_accounting_rows import samples

    return samples() + full_samples()


def test_every_current_schema_has_a_fast_decoder() -> None:
    serde = default_serde()
    assert set(serde.fast) == {e.fingerprint for e in serde.schemas.current.values()}


@pytest.mark.parametrize("event", _cases(), ids=lambda e: type(e).__name__)
def test_the_fast_decoder_reads_what_fastavro_reads(event: ev.Event) -> None:
    serde = default_serde()
    data = serde.encode(event)
    entry = serde.schemas.current[type(event).__name__]
    reference = schemaless_reader(io.BytesIO(data[10:]), entry.parsed, None)
    name, record = serde.decode_record(data)
    assert name == type(event).__name__
    assert record == reference
    assert _types(record) == _types(reference)
    assert serde.decode(data) == ev.EVENT_TYPES[name].model_validate(reference)


@pytest.mark.parametrize("damage", ["cut", "bad utf-8", "union branch", "array length"])
def test_a_damaged_current_schema_body_is_a_decode_error(damage: str) -> None:
    serde = default_serde()
    event = ev.TaskHeld(task_id="t", team="a", reason="quota", paths=["a.py"])
    data = serde.encode(event)
    header, body = data[:10], data[10:]
    tid = b"\x02t"   # task_id "t": length 1 (zigzag 2), then the byte
    at = body.index(tid)
    if damage == "cut":
        body = body[:-4]
    elif damage == "bad utf-8":
        body = body[:at + 1] + b"\xff" + body[at + 2:]
    elif damage == "union branch":   # causation_id's union index: 0 (null) -> 9 (none such)
        after_version = body.index(b"\x02a") + 2 + 6 + 1   # team, occurred_at (6 bytes), version
        assert body[after_version - 1:after_version + 1] == b"\x02\x00"   # version 1, null
        body = body[:after_version] + b"\x12" + body[after_version + 1:]
    else:   # the paths array's block count made negative and huge
        assert b"\x02\x08a.py" in body
        body = body.replace(b"\x02\x08a.py", b"\x81\x80\x80\x80\x10\x08a.py")
    assert serde.fast.get(data[2:10]) is not None
    with pytest.raises(DecodeError):
        serde.decode(header + body)


def test_with_fast_decoding_off_fastavro_decodes_everything() -> None:
    serde = Serde(default_serde().schemas, fast_decode=False)
    assert serde.fast == {}
    event = ev.TaskSubmitted(task_id="t", team="a", spec=FULL_SPEC, idempotency_key="k")
    data = serde.encode(event)
    assert serde.decode(data) == event == default_serde().decode(data)
