"""The CLI's shared helpers (fleetplane.cli.main), looked up when a command runs: command modules
are imported by main.py itself, so importing main at their top would be circular."""

from __future__ import annotations

from typing import Any


class _Main:
    def __getattr__(self, name: str) -> Any:
        from fleetplane.cli import main

        return getattr(main, name)


cli = _Main()
