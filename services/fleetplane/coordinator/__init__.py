"""Coordinator: the task-state table and dispatch of admitted tasks (Faust)."""
