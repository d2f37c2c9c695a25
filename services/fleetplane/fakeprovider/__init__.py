"""Loopback fake model provider (Anthropic Messages + OpenAI Chat Completions) for tests/demos.

The ``server`` names are imported lazily so ``python -m fleetplane.fakeprovider.server``
does not import that module twice.
"""

from typing import TYPE_CHECKING, Any

from .app import create_app
from .script import (
    CallRecord,
    InjectedError,
    Reply,
    Script,
    ScriptRunner,
    ToolUse,
    Usage,
    UsageOverride,
)

if TYPE_CHECKING:
    from .server import FakeProvider, ServeConfig, main, parse_config

_SERVER_NAMES = frozenset({"FakeProvider", "ServeConfig", "main", "parse_config"})

__all__ = [
    "CallRecord",
    "FakeProvider",
    "InjectedError",
    "Reply",
    "Script",
    "ScriptRunner",
    "ServeConfig",
    "ToolUse",
    "Usage",
    "UsageOverride",
    "create_app",
    "main",
    "parse_config",
]


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
