"""The coordinator's per-task state: one row of the ``tasks`` table, stored as JSON bytes."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from fleetplane.core.events import TaskSpec

#: How many processed event ids a task remembers for deduplication.
SEEN_EVENT_IDS = 32


class Status(StrEnum):
    DISPATCHED = "dispatched"  # an attempt is on tasks.dispatch, no executor has started it
    RUNNING = "running"  # an executor started the attempt (and heartbeats)
    # terminal
    COMPLETED = "completed"
    FAILED = "failed"
    ABANDONED = "abandoned"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {Status.COMPLETED, Status.FAILED, Status.ABANDONED, Status.CANCELLED, Status.ROLLED_BACK}
)


class Routing(BaseModel):
    """The router's choice for the current attempt (copied onto TaskDispatched)."""

    model_config = ConfigDict(frozen=True)

    model: str
    provider: str
    tier: str


class TaskState(BaseModel):
    """What the coordinator knows about one task. Immutable: ``decide`` returns new copies.

    ``spec`` and ``routing`` are dropped when the task reaches a terminal state (they are only
    needed to dispatch further attempts), which keeps the table small."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    task_id: str
    team: str
    status: Status
    attempt: int = 0  # highest attempt dispatched (0: none)
    spec: TaskSpec | None = None
    routing: Routing | None = None
    leased_paths: list[str] = Field(default_factory=list)
    executor_id: str | None = None
    last_heartbeat_at: datetime | None = None
    outcome: str | None = None  # the event type that ended the task
    updated_at: datetime
    seen: list[str] = Field(default_factory=list)  # last SEEN_EVENT_IDS processed event ids

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    def remember(self, event_id: str) -> list[str]:
        """``seen`` with ``event_id`` appended, bounded to SEEN_EVENT_IDS."""
        return [*self.seen, event_id][-SEEN_EVENT_IDS:]

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_defaults=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TaskState:
        return cls.model_validate_json(data)
