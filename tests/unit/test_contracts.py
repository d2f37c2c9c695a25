"""Shared contracts added for issues 3-7: schema history, team policy, audit chain, task types."""

from __future__ import annotations

import io
from pathlib import Path

import fastavro
import pytest

from fleetplane.core import events as ev
from fleetplane.core.auditchain import Chain, verify
from fleetplane.core.catalog import load_catalog
from fleetplane.core.schemas import load_schema_set
from fleetplane.core.serde import MAGIC, Serde
from fleetplane.core.teams import load_teams, parse_teams

ROOT = Path(__file__).resolve().parents[2]


def test_v1_payloads_decode_with_the_current_readers() -> None:
    """Records written before the issue-3..7 fields existed still decode, with the defaults."""
    schemas = load_schema_set(ROOT / "schemas")
    serde = Serde(schemas)
    history = sorted((ROOT / "schemas" / "history").glob("*.v1.avsc"))
    assert history, "schemas/history holds the v1 writers"
    spec_v1 = {"name": "n", "task_type": "summarize", "prompt": "p", "system_prompt": None,
               "repository": None, "ref": "main", "write_scope": [], "depends_on": [],
               "priority": "normal", "model_preference": "auto", "tier": None, "model": None,
               "allowed_tools": [], "max_cost_usd": None, "max_turns": 20, "timeout_s": 600,
               "max_attempts": 3, "failure_policy": "retry", "temperature": 0.0, "labels": {}}
    old = next(e for e in schemas.by_fingerprint.values()
               if e.name == "TaskDispatched" and e is not schemas.current["TaskDispatched"])
    record = {"event_id": "e1", "task_id": "t1", "team": "a", "occurred_at": 1_700_000_000_000,
              "schema_version": 1, "causation_id": None, "spec": spec_v1, "attempt": 1,
              "model": "m", "provider": "anthropic", "tier": "small", "leased_paths": ["src/**"]}
    buf = io.BytesIO()
    buf.write(MAGIC + old.fingerprint)
    fastavro.schemaless_writer(buf, old.parsed, record)
    event = serde.decode(buf.getvalue())
    assert isinstance(event, ev.TaskDispatched)
    assert event.action == "run" and event.inputs == {} and event.leased_paths == ["src/**"]
    assert event.spec.conflict_policy == "rollback" and event.spec.depth == 0


def test_every_history_file_is_a_distinct_older_writer() -> None:
    schemas = load_schema_set(ROOT / "schemas")
    for path in (ROOT / "schemas" / "history").glob("*.avsc"):
        name = path.name.split(".")[0]
        olds = [e for e in schemas.by_fingerprint.values()
                if e.name == name and e is not schemas.current[name]]
        assert olds, f"{path.name} has the current fingerprint (nothing to keep)"


def test_teams_inherit_defaults_and_reject_unknown_keys(tmp_path: Path) -> None:
    teams = load_teams(ROOT / "infra" / "teams.yaml")
    assert teams.policy("payments").weight == 2.0
    assert teams.policy("payments").max_running == teams.defaults.max_running
    assert teams.policy("nobody-listed") == teams.defaults
    with pytest.raises(ValueError, match="budget_dollars"):
        parse_teams({"teams": {"a": {"budget_dollars": 3}}})


def test_catalog_task_types_take_shorthand_and_mappings() -> None:
    catalog = load_catalog(ROOT / "infra" / "catalog.yaml")
    assert catalog.task_types["codegen"].tier == "standard"
    assert catalog.task_types["codegen"].failure_policies["timeout"] == "escalate"
    assert 0 < catalog.task_types["summarize"].quality_target <= 1


def _calls(n: int) -> list[ev.ModelCall | ev.ToolCall]:
    out: list[ev.ModelCall | ev.ToolCall] = []
    for i in range(n):
        if i % 2:
            out.append(ev.ToolCall(task_id="t", team="a", attempt=1, call_index=i,
                                   tool="read_file", arguments="{}", outcome="ok"))
        else:
            out.append(ev.ModelCall(task_id="t", team="a", attempt=1, call_index=i, model="m",
                                    provider="p", tier="small", input_tokens=i,
                                    output_tokens=1, cost_usd=0.001 * i, latency_ms=1.0,
                                    outcome="ok"))
    return out


def test_audit_chain_detects_change_removal_and_reordering() -> None:
    chain = Chain()
    linked = [chain.link(e) for e in _calls(5)]
    serde = Serde(load_schema_set(ROOT / "schemas"))
    roundtripped = [serde.decode(serde.encode(e)) for e in linked]
    assert verify(roundtripped, chain.head, chain.count).ok  # type: ignore[arg-type]

    changed = list(linked)
    changed[2] = changed[2].model_copy(update={"cost_usd": 0.0})
    assert not verify(changed, chain.head, chain.count).ok
    assert not verify(linked[:2] + linked[3:], chain.head, chain.count).ok
    assert not verify(linked[:-1], chain.head, chain.count).ok  # the last one removed
    swapped = [linked[1], linked[0], *linked[2:]]
    assert not verify(swapped, chain.head, chain.count).ok
