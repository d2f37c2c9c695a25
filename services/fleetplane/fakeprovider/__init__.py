"""Loopback fake model provider (Anthropic Messages + OpenAI Chat Completions) for tests/demos."""

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
from .server import FakeProvider, build_script, main

__all__ = [
    "CallRecord",
    "FakeProvider",
    "InjectedError",
    "Reply",
    "Script",
    "ScriptRunner",
    "ToolUse",
    "Usage",
    "UsageOverride",
    "build_script",
    "create_app",
    "main",
]
