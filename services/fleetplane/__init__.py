"""fleetplane: the control plane for a fleet of AI agents."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Client"]

if TYPE_CHECKING:
    from fleetplane.client import Client


def __getattr__(name: str) -> Any:
    # The SDK is imported on first use, so the services do not load it.
    if name == "Client":
        from fleetplane.client import Client

        return Client
    raise AttributeError(f"module 'fleetplane' has no attribute {name!r}")
