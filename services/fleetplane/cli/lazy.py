"""Modules the CLI loads when a command first uses them, not when `fleetplane` starts.

Every `fleetplane` call used to import the SDK, the settings (pydantic-settings), the audit
replay, httpx and the ingest's token store before typer even parsed the arguments: 4-12 s per
call on a loaded machine, most of it imports (`python -X importtime -m fleetplane.cli --help`,
docs/benchmarks.md "CLI start-up"). A command module names such a module with `lazy(...)`
(and imports it for real under TYPE_CHECKING, so mypy still checks every use): the module
object is a stand-in until an attribute is read (importlib.util.LazyLoader)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy(name: str) -> ModuleType:
    """Module `name`, executed on its first attribute access (at once if already imported)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
