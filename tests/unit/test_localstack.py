"""The local stack is found by one module with one rule: what the user set wins, then the
running stack's stack.json, then the defaults (the CLI, the SDK and the supervisor share it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetplane.client import resolve_token, resolve_url
from fleetplane.core import localstack
from fleetplane.core.settings import Settings


@pytest.fixture
def stack_dir(tmp_path: Path) -> Path:
    (tmp_path / "stack.json").write_text(json.dumps({
        "supervisor_pid": 1, "state": "ready", "bootstrap": "127.0.0.1:29092",
        "ingest_url": "http://127.0.0.1:18470", "accounting_url": "http://127.0.0.1:18471",
        "coordinator_url": "http://127.0.0.1:18472"}))
    (tmp_path / "admin.token").write_text("fpt_local\n")
    return tmp_path


def test_the_running_stack_is_used_unless_the_user_chose(stack_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FLEETPLANE_KAFKA_BOOTSTRAP", "FLEETPLANE_INGEST_URL", "FLEETPLANE_TOKEN",
                "FLEETPLANE_ACCOUNTING_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLEETPLANE_CONFIG_FILE", str(stack_dir / "no-config.yaml"))
    settings = Settings(data_dir=stack_dir)
    assert localstack.kafka_settings(settings).kafka_bootstrap == "127.0.0.1:29092"
    assert localstack.ingest_url(settings) == resolve_url(settings) == "http://127.0.0.1:18470"
    assert localstack.accounting_url(settings) == "http://127.0.0.1:18471"
    assert localstack.coordinator_url(settings) == "http://127.0.0.1:18472"
    assert resolve_token(settings) == localstack.admin_token(settings) == "fpt_local"

    monkeypatch.setenv("FLEETPLANE_KAFKA_BOOTSTRAP", "10.0.0.1:9092")
    monkeypatch.setenv("FLEETPLANE_INGEST_URL", "https://fleet.example")
    chosen = Settings(data_dir=stack_dir)
    assert localstack.kafka_settings(chosen).kafka_bootstrap == "10.0.0.1:9092"
    assert localstack.ingest_url(chosen) == resolve_url(chosen) == "https://fleet.example"
    # an explicit argument is a choice too
    assert localstack.kafka_settings(Settings(data_dir=stack_dir, kafka_bootstrap="h:1")
                                     ).kafka_bootstrap == "h:1"


def test_no_stack_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEETPLANE_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("FLEETPLANE_INGEST_URL", raising=False)
    settings = Settings(data_dir=tmp_path)
    assert localstack.read_state(settings) is None
    assert localstack.kafka_settings(settings) is settings
    assert localstack.ingest_url(settings) == settings.resolved_ingest_url()
    assert localstack.admin_token(settings) == ""
    (tmp_path / "stack.json").write_text("{half a file")  # written while we read
    assert localstack.read_state(settings) is None
