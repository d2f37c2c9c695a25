"""The chaos run at CI scale: every service SIGKILLed and restarted in turn, the broker restarted
and SIGKILLed, the fake provider failing 10% of calls and stalling some, while tasks flow. The
large run is `make chaos` (bench/chaos.py, 2,000 tasks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench.chaos import ChaosConfig, print_result, run_chaos
from rich.console import Console

from fleetplane.cli.stack import SERVICES

# Both were quarantined on 2026-12-05 (duplicated outcomes, audit breaks, then a stall after the
# planned broker restart); the causes found are in docs/reliability.md ("Stop 13's CI", "A broker
# restart stopped the pipeline for good", "A broker restart killed the idempotent producers").
# Both are back in the gate (make test-long).
pytestmark = [pytest.mark.e2e, pytest.mark.reliability, pytest.mark.long,
              # the settle windows below are 240-300 s: the suite's 300 s would cut a slow run
              pytest.mark.timeout(900)]


def test_kills_and_broker_restart_lose_duplicate_and_strand_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ChaosConfig(tasks=120, rate=10.0, settle_s=300.0, kill_broker=False)
    result = run_chaos(cfg, data_dir=tmp_path / "chaos", console=Console(stderr=True))
    with capsys.disabled():
        print_result(result, Console(width=110))

    assert result.faults == [*cfg.kill_order, "broker"], "every fault of the plan was injected"
    assert set(cfg.kill_order) == set(SERVICES)
    v = result.verdict
    assert v["acknowledged"] == v["accepted"] == cfg.tasks
    assert sum(v["terminal"].values()) == cfg.tasks
    outcomes = v["model_call_outcomes"]
    assert sum(n for kind, n in outcomes.items() if kind != "ok") > 0, (
        f"the provider's injected failures reached the audit log: {outcomes}")
    assert result.git["commits"] >= cfg.tasks // 3 * 0.9, "workspace tasks committed"
    assert result.problems == {}, json.dumps(
        {"counts": result.counts, "examples": v.get("examples"),
         "clickhouse": result.clickhouse, "git": result.git}, indent=1, default=str)[:6000]


def test_broker_sigkill_mid_run_supervisor_restarts_it_and_nothing_stays_stuck(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19: the broker SIGKILLed while tasks flow (it loses what it acknowledged last); the
    supervisor restarts it; after the reconciler's deadline every task the broker kept has
    ended, and the submissions it lost are done once the client sends them again with the same
    idempotency keys."""
    cfg = ChaosConfig(tasks=60, rate=6.0, settle_s=240.0, kill_order=(), restart_broker=False,
                      kill_broker=True, failure_rate=0.0, stall_rate=0.0,
                      reconciler_deadline_s=10.0)
    result = run_chaos(cfg, data_dir=tmp_path / "chaos", console=Console(stderr=True))
    with capsys.disabled():
        print_result(result, Console(width=110))

    assert result.faults == ["broker-kill"]
    v = result.verdict
    assert v["acknowledged"] == cfg.tasks
    assert result.broker_lost_done == len(result.broker_lost), result.broker_lost
    assert sum(v["terminal"].values()) == v["accepted"] == cfg.tasks
    assert result.problems == {}, json.dumps(
        {"counts": result.counts, "examples": v.get("examples"),
         "clickhouse": result.clickhouse, "reconciler": result.reconciler},
        indent=1, default=str)[:6000]
