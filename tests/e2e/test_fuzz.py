"""Fuzz at CI scale on the session stack (bench/fuzz.py; `make fuzz` runs it large): hostile
requests at every ingest endpoint and hostile records on tasks.submitted and the internal topics.
Zero crashes: no 5xx, every undecodable record dead-lettered with a reason by every service that
consumes its topic, every service process alive and never restarted, injection strings that are
valid input returned verbatim, and a valid task submitted afterwards completes."""

from __future__ import annotations

import json

import pytest
from bench import fuzz

from fleetplane.cli.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]


def test_fuzz_http_and_raw_kafka_paths_crash_nothing(stack: Stack) -> None:
    report = fuzz.run(stack, http_requests=200, raw_per_kind=1, seed=7)
    print("\nfuzz counts:", json.dumps(report.summary(), indent=1))
    print("dead letters (service, topic, class):",
          {" ".join(k): n for k, n in sorted(report.dlq.items())})
    print("dead letters by reason:", {" | ".join(k): n for k, n in
                                      sorted(report.dlq_reasons.items())})
    assert report.http_total >= 200
    assert report.server_errors == [] and report.http_5xx == 0
    assert report.bad_answers == []
    assert report.crashed == []
    assert report.missing_dlq == []
    assert report.verbatim_mismatches == []
    assert report.final_state == "completed"
    # every undecodable record was dead-lettered by each consumer of its topic
    undecodable = sum(n for (_, kind), n in report.raw_sent.items()
                      if kind in fuzz.UNDECODABLE)
    required = sum(len(fuzz.CONSUMERS[topic]) * n for (topic, kind), n
                   in report.raw_sent.items() if kind in fuzz.UNDECODABLE)
    assert undecodable == 5 * len(fuzz.CONSUMERS)
    assert sum(report.dlq.values()) >= required
