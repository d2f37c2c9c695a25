"""Property-based: whatever a producer puts on tasks.submitted, the ingest loop answers with an
acceptance or a deliberate rejection (a DeadLetter whose reason names the problem), never an
unexpected exception; the HTTP manifest model and the raw-path validator agree."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetplane.core import events as ev
from fleetplane.core.loop import Processor, Record
from fleetplane.core.settings import Settings
from fleetplane.ingest.handlers import accept
from fleetplane.ingest.manifest import TaskManifest, check_spec, reference_problem
from tests.hostile import hostile_manifests, hostile_records

OUTCOMES: Counter[str] = Counter()
processor = Processor("ingest", ["tasks.submitted"], accept, Settings())


@settings(max_examples=150, deadline=None)
@given(hostile_records(), st.binary(max_size=20))
def test_every_raw_record_is_accepted_or_dead_lettered_with_a_reason(
        record: tuple[str, bytes], key: bytes) -> None:
    kind, value = record
    out = processor._handle_one(Record("tasks.submitted", 0, 7, key, value))
    if any(isinstance(e, ev.TaskAccepted) for e in out):
        assert len(out) == 1
        OUTCOMES[f"raw {kind}: accepted"] += 1
        return
    dead = [e for e in out if isinstance(e, ev.DeadLetter)]
    assert len(dead) == 1, out
    d = dead[0]
    assert d.error_class in ("DecodeError", "Rejected"), (d.error_class, d.reason)
    assert d.reason and d.payload == value and d.source_offset == 7
    for rejected in (e for e in out if isinstance(e, ev.TaskRejected)):
        assert rejected.field and rejected.field in d.reason
    OUTCOMES[f"raw {kind}: {d.error_class}"] += 1


@settings(max_examples=150, deadline=None)
@given(hostile_manifests())
def test_http_model_and_raw_validator_agree_on_hostile_manifests(doc: object) -> None:
    try:
        manifest = TaskManifest.model_validate(doc)
    except ValidationError as exc:
        assert all(e["loc"] or e["type"] == "model_type" for e in exc.errors())
        OUTCOMES["manifest: 422"] += 1
        return
    # what the HTTP path lets through (the model, then the references it checks after the
    # model: ingest.manifest.reference_problem), the raw-path validator accepts too
    spec = manifest.to_spec()
    if reference_problem(spec, None, None) is not None:
        OUTCOMES["manifest: 422 (reference)"] += 1
        return
    assert check_spec(manifest.metadata.team or "fuzz-team", spec) is None
    OUTCOMES["manifest: valid"] += 1


def test_report_counts() -> None:
    print("\nhypothesis outcomes (unit):", dict(sorted(OUTCOMES.items())))
