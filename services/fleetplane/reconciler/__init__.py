"""The reconciler: re-drives tasks whose next event was lost (issue 19)."""
