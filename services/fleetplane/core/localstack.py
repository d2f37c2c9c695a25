"""The local embedded stack (`fleetplane up`), found in one place: where its state file and
admin token are, which broker and URLs it runs on, and when the user's own settings win.

The rule, the same for the CLI, the SDK and the supervisor: a value the user set (an
environment variable, a settings argument, the SDK's config file where the SDK reads one) wins;
otherwise the running stack's value (from `<data dir>/stack.json`); otherwise the default."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fleetplane.core.settings import Settings

STATE_FILE = "stack.json"
ADMIN_TOKEN_FILE = "admin.token"


def state_file(settings: Settings) -> Path:
    return settings.resolved_data_dir() / STATE_FILE


def admin_token_file(settings: Settings) -> Path:
    return settings.resolved_data_dir() / ADMIN_TOKEN_FILE


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The running stack's state (None when there is none or it cannot be read)."""
    try:
        data = json.loads(state_file(settings).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def stack_value(settings: Settings, key: str) -> str | None:
    state = read_state(settings)
    value = state.get(key) if state else None
    return str(value) if value else None


def user_set(settings: Settings, field: str) -> bool:
    """Did the user choose this setting (environment, argument), rather than the default?"""
    return field in settings.model_fields_set


def kafka_settings(settings: Settings) -> Settings:
    """`settings` pointed at the running stack's broker unless the user chose a bootstrap."""
    bootstrap = stack_value(settings, "bootstrap")
    if bootstrap and not user_set(settings, "kafka_bootstrap"):
        return settings.model_copy(update={"kafka_bootstrap": bootstrap})
    return settings


def ingest_url(settings: Settings) -> str:
    if settings.ingest_url:
        return settings.ingest_url
    return stack_value(settings, "ingest_url") or settings.resolved_ingest_url()


def accounting_url(settings: Settings) -> str:
    if settings.accounting_url:
        return settings.accounting_url
    return stack_value(settings, "accounting_url") or settings.resolved_accounting_url()


def coordinator_url(settings: Settings) -> str:
    return stack_value(settings, "coordinator_url") or \
        f"http://{settings.bind_host}:{settings.coordinator_web_port}"


def admin_token(settings: Settings) -> str:
    """The local stack's admin token ("" when there is no local stack)."""
    path = admin_token_file(settings)
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
