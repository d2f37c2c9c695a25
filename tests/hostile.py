"""Hypothesis strategies for hostile input: malformed, oversized and malicious task manifests
(HTTP path) and raw records (Kafka path). Shared by the unit, integration and e2e tests."""

from __future__ import annotations

import copy
import json
from typing import Any

from bench.fuzz import set_path
from hypothesis import strategies as st

from fleetplane.core import events as ev
from fleetplane.core.serde import MAGIC, default_serde

INJECTIONS = [
    "../../etc/passwd", "/etc/shadow", "..\\..\\windows", "'; DROP TABLE tasks; --",
    "\" OR 1=1 --", "$(rm -rf /)", "`reboot`", "{{7*7}}", "${jndi:ldap://x}", "<script>x</script>",
    "a\x00b", "\u202eevil", "\uff50\uff41\uff59\uff4d\uff45\uff4e\uff54\uff53",  # fullwidth
    "payments\n", " payments", "Payments", "💸",
    "a" * 64, "x" * 5000, "-", ".", "",
]

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(INJECTIONS),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)
hostile_strings = st.one_of(
    st.sampled_from(INJECTIONS),
    st.text(max_size=80),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=30),
    st.characters(categories=["Cs"]).map(lambda c: f"x{c}y"),   # lone surrogates
    st.integers(min_value=210_000, max_value=300_000).map(lambda n: "A" * n),  # oversized
)
hostile_values = st.one_of(hostile_strings, json_values)


def as_json(doc: Any) -> bytes:
    """JSON as a careless client writes it: NaN/Infinity tokens, lone surrogates escaped."""
    return json.dumps(doc).encode()


def valid_manifest() -> dict[str, Any]:
    return {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
            "metadata": {"name": "fuzz", "team": "fuzz-team"},
            "spec": {"taskType": "summarize", "prompt": "summarize the fuzz report",
                     "writeScope": ["docs/**"], "workspace": {"repository": "fuzz-repo"}}}


PATHS = [
    ("apiVersion",), ("kind",), ("metadata",), ("metadata", "name"), ("metadata", "team"),
    ("metadata", "labels"), ("spec",), ("spec", "taskType"), ("spec", "prompt"),
    ("spec", "systemPrompt"), ("spec", "workspace"), ("spec", "workspace", "repository"),
    ("spec", "workspace", "ref"), ("spec", "writeScope"), ("spec", "dependsOn"),
    ("spec", "priority"), ("spec", "model"), ("spec", "model", "name"), ("spec", "tools"),
    ("spec", "limits"), ("spec", "limits", "maxTurns"), ("spec", "limits", "maxCostUsd"),
    ("spec", "failurePolicy"), ("spec", "failurePolicies"), ("spec", "commands"),
    ("spec", "contextFiles"), ("spec", "temperature"), ("idempotencyKey",),
]


@st.composite
def hostile_manifests(draw: st.DrawFn) -> Any:
    """A manifest with one to three fields replaced by hostile values, an unknown field added,
    a list field stuffed, or a completely arbitrary JSON document."""
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "unknown", "lists", "random"]))
    if kind == "random":
        return draw(json_values)
    doc = copy.deepcopy(valid_manifest())
    if kind == "unknown":
        path = draw(st.sampled_from([("surprise",), ("spec", "surprise"),
                                     ("metadata", "surprise"), ("spec", "limits", "x")]))
        key = draw(st.sampled_from(INJECTIONS[:8]) | st.text(min_size=1, max_size=12))
        set_path(doc, (*path[:-1], key if path[-1] == "surprise" else path[-1]),
             draw(hostile_values))
        if path[-1] == "surprise" and key in ("apiVersion", "kind", "metadata", "spec",
                                               "idempotencyKey"):
            set_path(doc, ("spec", "unknownField"), 1)
        return doc
    if kind == "lists":
        field = draw(st.sampled_from(["writeScope", "dependsOn", "tools", "commands",
                                      "contextFiles"]))
        item = draw(st.sampled_from(INJECTIONS) | st.text(max_size=20))
        doc["spec"][field] = [item] * draw(st.integers(min_value=1, max_value=400))
        return doc
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        set_path(doc, draw(st.sampled_from(PATHS)), draw(hostile_values))
    return doc


# -- raw records for tasks.submitted -----------------------------------------------------------
def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


avro_int = st.integers(min_value=-(2**31), max_value=2**31 - 1)
hostile_specs = st.builds(
    ev.TaskSpec,
    name=hostile_strings.filter(lambda s: len(s) < 1000 and _encodable(s)) | st.just("ok"),
    task_type=st.sampled_from(["summarize", "Bad Type", "", "x" * 100, "../x"]),
    prompt=st.sampled_from(["p", "", "A" * 200_001]) | st.text(max_size=50),
    write_scope=st.lists(st.sampled_from(INJECTIONS) | st.just("src/**"), max_size=3),
    priority=st.sampled_from(["normal", "urgent", ""]),
    failure_policy=st.sampled_from(["retry", "pray"]),
    max_turns=avro_int, timeout_s=avro_int, max_attempts=avro_int, depth=avro_int,
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    max_cost_usd=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    model_preference=st.sampled_from(["auto", "pinned", "sideways"]),
    parent_task_id=st.none() | st.just("parent"),
    labels=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)


@st.composite
def hostile_records(draw: st.DrawFn, task_id: str = "t") -> tuple[str, bytes]:
    """(kind, value bytes) of a record a producer might put on tasks.submitted."""
    serde = default_serde()
    kind = draw(st.sampled_from(["garbage", "magic-garbage", "other-event", "bad-fields",
                                 "truncated"]))
    if kind == "garbage":
        return kind, draw(st.binary(max_size=300))
    if kind == "magic-garbage":
        return kind, MAGIC + draw(st.binary(min_size=0, max_size=200))
    team = draw(st.sampled_from(["payments", "Not A Team", "", "x" * 200]))
    if kind == "other-event":
        event: ev.Event = ev.TaskHeld(task_id=task_id, team=team, reason="not a submission")
        return kind, serde.encode(event)
    spec = draw(hostile_specs)
    encoded = serde.encode(ev.TaskSubmitted(task_id=task_id, team=team, spec=spec,
                                            idempotency_key=draw(st.none() | st.just(""))))
    if kind == "truncated":
        return kind, encoded[: draw(st.integers(min_value=0, max_value=len(encoded) - 1))]
    return kind, encoded
