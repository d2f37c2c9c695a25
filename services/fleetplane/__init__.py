"""fleetplane: the control plane for a fleet of AI agents."""

__version__ = "0.1.0"
