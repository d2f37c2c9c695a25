"""The admission policy from the settings: teams, the catalog's tiers and task types, limits
and timeouts (coordinator.scheduler.AdmissionPolicy)."""

from __future__ import annotations

from pathlib import Path

import yaml

from fleetplane.coordinator.scheduler import AdmissionPolicy
from fleetplane.core.catalog import Catalog, _task_type
from fleetplane.core.settings import Settings
from fleetplane.core.teams import load_teams


def tiers_catalog(path: Path) -> Catalog | None:
    """The catalog's tiers and task types only: the coordinator needs no prices (loading them
    would import litellm, seconds of start-up for nothing)."""
    if not path.exists():
        return None
    raw = yaml.safe_load(path.read_text()) or {}
    tiers = [str(x) for x in raw.get("tiers") or []]
    types = {name: _task_type(name, v) for name, v in (raw.get("task_types") or {}).items()}
    return Catalog(tiers=tiers, default_tier=str(raw.get("default_tier", tiers[0] if tiers
                                                                          else "")),
                   models={}, task_types=types)


def policy_for_settings(settings: Settings) -> AdmissionPolicy:
    catalog = tiers_catalog(settings.catalog_file)
    return AdmissionPolicy(teams=load_teams(settings.teams_file), catalog=catalog,
                  max_running=settings.coordinator_max_running,
                  heartbeat_timeout_ms=int(settings.coordinator_heartbeat_timeout_s * 1000),
                  backoff_base_ms=settings.coordinator_backoff_base_ms,
                  backoff_cap_ms=settings.coordinator_backoff_cap_ms,
                  start_timeout_ms=int(settings.coordinator_start_timeout_s * 1000),
                  reservations=settings.coordinator_reservations,
                  conflict_hold_timeout_ms=int(
                      settings.coordinator_conflict_hold_timeout_s * 1000),
                  terminal_retention_ms=int(settings.coordinator_terminal_retention_s * 1000),
                  terminal_max_rows=settings.coordinator_terminal_max_rows)
