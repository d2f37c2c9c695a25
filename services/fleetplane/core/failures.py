"""Failure classes and failure policies: the shared vocabulary of executor, coordinator and router.

The executor (or the coordinator, for a lost executor or a conflict) classifies every failed
attempt; the coordinator maps the class to a policy: the manifest's ``failure_policies`` for that
class, else the task type's (infra/catalog.yaml), else the manifest's ``failure_policy``.
"""

from __future__ import annotations

from collections.abc import Mapping

MODEL_ERROR = "model_error"  # the provider failed (after in-attempt retries) or refused
TOOL_ERROR = "tool_error"  # a tool failed in a way the agent could not recover from
TIMEOUT = "timeout"  # the attempt's wall-time limit
BUDGET_EXCEEDED = "budget_exceeded"  # the next call would exceed the dollar limit
LIMIT_EXCEEDED = "limit_exceeded"  # turns or tokens
CONFLICT = "conflict"  # changes outside the write scope or inside another running task's scope
LOST_EXECUTOR = "lost_executor"  # no heartbeat for the configured time
CANCELLED = "cancelled"  # stopped on request (not subject to a policy)
# permanent: another attempt cannot succeed, so no policy retries, escalates or holds for them
CONFIGURATION = "configuration"  # e.g. the repository is not registered, the ref does not exist
VALIDATION = "validation"  # the task's input is invalid (caught after intake)
PERMISSION = "permission"  # the task may not do what it asks (e.g. a repository it cannot use)
PERMANENT_CLASSES: tuple[str, ...] = (CONFIGURATION, VALIDATION, PERMISSION)

FAILURE_CLASSES: tuple[str, ...] = (
    MODEL_ERROR, TOOL_ERROR, TIMEOUT, BUDGET_EXCEEDED, LIMIT_EXCEEDED, CONFLICT, LOST_EXECUTOR,
)
FAILURE_POLICIES: tuple[str, ...] = ("retry", "escalate", "abandon", "rollback", "hold")
CONFLICT_POLICIES: tuple[str, ...] = ("rollback", "hold")


def is_permanent(failure_class: str) -> bool:
    """A failure no retry can fix: the task fails at once, whatever its policies say."""
    return failure_class in PERMANENT_CLASSES


def policy_for(failure_class: str, default: str, *overrides: Mapping[str, str]) -> str:
    """The first override naming `failure_class`, else `default`."""
    for mapping in overrides:
        found = mapping.get(failure_class)
        if found:
            return found
    return default
