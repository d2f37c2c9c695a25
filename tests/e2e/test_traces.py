"""One trace per task across the services (docs/operations.md, "Traces"): the e2e stack's
services export their spans with the OpenTelemetry SDK to JSON-lines files
(FLEETPLANE_TRACE_FILE, tests/e2e/conftest.py); the trace context travels in the Kafka record
headers and reaches the model provider as an HTTP header."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from typing import Any

import httpx

from fleetplane.cli.stack import Stack

from .conftest import auth, manifest, submit, wait_terminal

PIPELINE = {"fleetplane-ingest", "fleetplane-router", "fleetplane-coordinator",
            "fleetplane-executor", "fleetplane-accounting"}


def spans(stack: Stack, *needles: str) -> list[dict[str, Any]]:
    """Every exported span; with `needles`, only those whose JSON line holds one of them (the
    files hold every e2e test's spans by now: parsing each line on every look cost seconds)."""
    out = []
    for path in sorted((stack.data_dir / "traces").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip() and (not needles or any(n in line for n in needles)):
                out.append(json.loads(line))
    return out


def trace_of(stack: Stack, task_id: str) -> tuple[set[str], list[dict]]:
    """The trace ids of the task's spans, and every span of those traces."""
    ids = {s["context"]["trace_id"] for s in spans(stack, task_id)
           if (s.get("attributes") or {}).get("fleetplane.task_id") == task_id}
    if not ids:
        return ids, []
    return ids, [s for s in spans(stack, *ids) if s["context"]["trace_id"] in ids]


def services(trace: list[dict[str, Any]]) -> set[str]:
    return {s["resource"]["attributes"]["service.name"] for s in trace}


def whole(trace: list[dict[str, Any]]) -> bool:
    """Every service's spans are there, the model call's and accounting's included, and every
    span's parent is in the trace (one root, which may have the caller's span as parent)."""
    if not (services(trace) >= PIPELINE and any(s["name"].startswith("model ") for s in trace)
            and any(s["name"] == "accounting TaskCompleted" for s in trace)):
        return False
    ids = {s["context"]["span_id"] for s in trace}
    return len([s for s in trace if s["parent_id"] not in ids]) == 1


def wait_spans(stack: Stack, task_id: str, timeout_s: float = 60.0
               ) -> tuple[set[str], list[dict[str, Any]]]:
    """Spans are exported in batches (every second, by each process): wait until the task's
    trace is whole (or the timeout: the assertions then say what is missing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ids, trace = trace_of(stack, task_id)
        if whole(trace) or time.monotonic() > deadline:
            return ids, trace
        time.sleep(0.5)


def test_one_trace_per_task_from_the_request_to_the_model_call(stack: Stack) -> None:
    team = f"traces-{uuid.uuid4().hex[:6]}"
    client_trace, client_span = secrets.token_hex(16), secrets.token_hex(8)
    with httpx.Client(timeout=30) as http:
        joined = http.post(f"{stack.ingest_url}/v1/tasks",
                           json=manifest(team, "t-joined", "summarize the joined one"),
                           headers={**auth(stack.admin_token),
                                    "traceparent": f"00-{client_trace}-{client_span}-01"})
        assert joined.status_code == 202, joined.text
        assert joined.headers["traceresponse"].split("-")[1] == client_trace
        a = joined.json()["task_id"]
        b = submit(http, stack, manifest(team, "t-fresh", "summarize the fresh one"))
        wait_terminal(http, stack, {a, b}, timeout_s=120)
        ids_a, trace_a = wait_spans(stack, a)
        ids_b, trace_b = wait_spans(stack, b)
        calls = http.get(f"{stack.provider_url}/_fake/calls").json()
        recorded = http.get(f"{stack.accounting_url}/v1/tasks/{a}/trace").json()

    # the caller's trace went on through every service
    assert ids_a == {f"0x{client_trace}"}
    assert services(trace_a) >= PIPELINE, services(trace_a)
    by_id = {s["context"]["span_id"]: s for s in trace_a}
    (server,) = [s for s in trace_a if s["parent_id"] == f"0x{client_span}"]
    assert server["name"] == "ingest POST /v1/tasks" and server["kind"] == "SpanKind.SERVER"
    # one tree: every other span's parent is a span of this trace
    orphans = [s["name"] for s in trace_a if s is not server and s["parent_id"] not in by_id]
    assert not orphans, orphans
    hops: dict[str, list[str]] = defaultdict(list)
    for s in trace_a:
        hops[s["resource"]["attributes"]["service.name"]].append(s["name"])
    assert "router TaskAccepted" in hops["fleetplane-router"], hops
    assert "executor TaskDispatched" in hops["fleetplane-executor"], hops
    (model,) = [s for s in trace_a if s["name"].startswith("model ")]
    assert by_id[model["parent_id"]]["name"] == "executor TaskDispatched"
    assert model["attributes"]["gen_ai.usage.input_tokens"] > 0
    # the provider got the attempt's context
    sent = [c["traceparent"] for c in calls if c.get("traceparent")
            and c["traceparent"].split("-")[1] == client_trace]
    assert sent, "no model call carried the task's traceparent"
    # queryable: accounting recorded the trace id, and `fleetplane describe` prints it
    assert recorded == {"task_id": a, "trace_ids": [client_trace]}
    described = subprocess.run(
        [sys.executable, "-m", "fleetplane.cli.main", "describe", "task", a],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "FLEETPLANE_INGEST_URL": stack.ingest_url,
             "FLEETPLANE_ACCOUNTING_URL": stack.accounting_url,
             "FLEETPLANE_TOKEN": stack.admin_token, "FLEETPLANE_DATA_DIR": str(stack.data_dir)})
    assert described.returncode == 0, described.stderr
    assert f"Trace:       {client_trace}" in described.stdout, described.stdout

    # a request without a traceparent starts a trace of its own, as whole as the first
    assert len(ids_b) == 1 and ids_b != ids_a
    assert services(trace_b) >= PIPELINE, services(trace_b)
    b_ids = {s["context"]["span_id"] for s in trace_b}
    roots = [s for s in trace_b if s["parent_id"] not in b_ids]
    assert [r["name"] for r in roots] == ["ingest POST /v1/tasks"], [r["name"] for r in roots]
