"""docker-compose.yml cannot run here (no Docker daemon): keep it consistent with the code."""

import tomllib
from pathlib import Path

import yaml

from fleetplane.core.settings import Settings
from fleetplane.core.topics import load_topics

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_every_service_with_a_real_entry_point() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    services = compose["services"]
    for name in ("ingest", "router", "coordinator", "executor", "accounting", "reconciler"):
        command = services[name]["command"]
        assert command in scripts, f"{name}: {command} is not a console script"
        env = services[name]["environment"]
        assert set(env) >= {"FLEETPLANE_KAFKA_BOOTSTRAP", "FLEETPLANE_CLICKHOUSE_DSN"}
        # every FLEETPLANE_ variable names a real setting
        fields = {f"FLEETPLANE_{k.upper()}" for k in Settings.model_fields}
        assert set(env) <= fields, set(env) - fields
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_topics_file_is_co_partitioned_for_task_topics() -> None:
    specs = load_topics(ROOT / "infra" / "topics.yaml")
    task_topics = [s for s in specs if s.key == "task_id"]
    assert len({s.partitions for s in task_topics}) == 1
    assert len({s.name for s in specs}) == len(specs)
