"""The task-state vocabulary, defined once: what a task's state is called wherever it is shown
(the API, ClickHouse, the CLI and SDK, the dashboard, the bench and chaos reports).

These are the states users see, derived from the events of a task (accounting.rows maps each event
type to its state). The coordinator's own `coordinator.state.Status` is finer-grained bookkeeping
(waiting, escalating, rolling_back) and maps onto these; its terminal statuses are the terminal
states below.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

TaskState = Literal[
    "submitted", "accepted", "routed", "held", "dispatched", "running", "attempt_failed",
    "retrying", "escalated", "rejected", "completed", "failed", "abandoned", "cancelled",
    "rolled_back",
]

#: Every state, in lifecycle order.
STATES: Final[tuple[str, ...]] = get_args(TaskState)

#: A task in one of these never moves again (invariant 1: exactly one per accepted task;
#: "rejected" is the terminal state of a submission that was never accepted).
TERMINAL_STATES: Final[frozenset[str]] = frozenset(
    {"rejected", "completed", "failed", "abandoned", "cancelled", "rolled_back"})

#: Waiting for a slot, a lease, a quota or a backoff (the queue).
QUEUED_STATES: Final[tuple[str, ...]] = (
    "submitted", "accepted", "routed", "attempt_failed", "retrying", "escalated")

#: An attempt is out: dispatched to an executor or running there.
RUNNING_STATES: Final[tuple[str, ...]] = ("dispatched", "running")

#: Lifecycle rank: breaks ties between events of the same millisecond (later wins).
STATE_RANK: Final[dict[str, int]] = {
    "submitted": 1, "accepted": 2, "routed": 3, "held": 4, "dispatched": 5, "running": 6,
    "attempt_failed": 7, "retrying": 8, "escalated": 8,
    "rejected": 9, "completed": 9, "failed": 9, "abandoned": 9, "cancelled": 9,
    "rolled_back": 10,
}


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATES
