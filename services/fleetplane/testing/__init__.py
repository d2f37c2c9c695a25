"""Harnesses for testing fleetplane deployments: invariant checks over the event log."""
