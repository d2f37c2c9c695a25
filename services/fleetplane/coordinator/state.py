"""The coordinator's rows: one ``TaskRow`` per task and one ``FleetState`` (fleet-wide control
and spend), stored as JSON bytes in the scheduler table."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from fleetplane.core.events import TaskSpec

#: How many processed event ids a task remembers for deduplication.
SEEN_EVENT_IDS = 32


class Status(StrEnum):
    WAITING = "waiting"  # admitted by nobody yet: held (see hold_kind) or about to be dispatched
    DISPATCHED = "dispatched"  # an attempt is on tasks.dispatch, no executor has started it
    RUNNING = "running"  # an executor started the attempt (and heartbeats)
    ESCALATING = "escalating"  # TaskEscalated sent; waits for the router's next TaskRouted
    ROLLING_BACK = "rolling_back"  # a rollback job is dispatched; waits for TaskRolledBack
    # terminal
    COMPLETED = "completed"
    FAILED = "failed"
    ABANDONED = "abandoned"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Holds its write-scope lease and counts against its team's running quota."""
        return self in ACTIVE


TERMINAL = frozenset(
    {Status.COMPLETED, Status.FAILED, Status.ABANDONED, Status.CANCELLED, Status.ROLLED_BACK}
)
ACTIVE = frozenset({Status.DISPATCHED, Status.RUNNING, Status.ROLLING_BACK})

#: hold kinds that keep a waiting task out of the admission queue (it waits for an event)
PARKED = frozenset({"dependency", "backoff", "approval"})


class Routing(BaseModel):
    """The router's choice for the current attempt (copied onto TaskDispatched)."""

    model_config = ConfigDict(frozen=True)

    model: str
    provider: str
    tier: str


class TaskRow(BaseModel):
    """What the coordinator knows about one task. Immutable: the scheduler stores new copies.

    ``spec`` and ``routing`` are dropped when the task reaches a terminal state (they are only
    needed to dispatch further attempts), which keeps the table small; ``output`` is kept for
    the tasks that depend on a completed one."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    task_id: str
    team: str
    status: Status
    attempt: int = 0  # highest attempt dispatched (0: none)
    next_attempt: int = 1  # the attempt a waiting task dispatches when admitted
    spec: TaskSpec | None = None
    routing: Routing | None = None
    seq: int = 0  # arrival order (FIFO within a team and priority)
    leased_paths: list[str] = Field(default_factory=list)
    dispatched_at: datetime | None = None
    executor_id: str | None = None
    last_heartbeat_at: datetime | None = None
    # the hold last reported (TaskHeld), while waiting
    hold_kind: str | None = None
    hold_reason: str = ""
    held_by: str | None = None
    held_paths: list[str] = Field(default_factory=list)
    held_since: datetime | None = None
    not_before: datetime | None = None  # backoff: not dispatched before this time
    conflict_hold: bool = False  # a conflict waits for approve (keep) / reject (roll back)
    conflict_held_at: datetime | None = None  # since when (the conflict hold's timeout)
    lease_until: datetime | None = None  # the executor's durable lease (TaskStarted/Heartbeat)
    passed_over: bool = False  # conflict-held by a lease admitted after it began to wait
    output: str | None = None  # TaskCompleted.output, for dependents
    outcome: str | None = None  # the event type that ended the task
    outcome_reason: str | None = None  # why it failed / was cancelled (told to dependents)
    updated_at: datetime
    seen: list[str] = Field(default_factory=list)  # last SEEN_EVENT_IDS processed event ids

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    @property
    def repository(self) -> str:
        return (self.spec.repository or "") if self.spec else ""

    @property
    def ready(self) -> bool:
        """Waiting for admission only (not for a dependency, a backoff or an approval)."""
        return self.status is Status.WAITING and self.hold_kind not in PARKED

    def remember(self, event_id: str) -> list[str]:
        """``seen`` with ``event_id`` appended, bounded to SEEN_EVENT_IDS."""
        return [*self.seen, event_id][-SEEN_EVENT_IDS:]

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_defaults=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TaskRow:
        return cls.model_validate_json(data)


class Spend(BaseModel):
    model_config = ConfigDict(frozen=True)

    period: str  # e.g. 2026-11-24 (day), 2026-W48 (week), 2026-11 (month)
    usd: float = 0.0


class FleetState(BaseModel):
    """Fleet-wide facts: the kill switch, paused teams, spend per team and budget period, the
    latest budget verdict from accounting, the scheduler clock and the arrival counter."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kill_switch: bool = False
    kill_switch_reason: str = ""
    paused: dict[str, str] = Field(default_factory=dict)  # team -> reason
    spend: dict[str, Spend] = Field(default_factory=dict)  # team -> spend this period
    budget_exhausted: dict[str, str] = Field(default_factory=dict)  # team -> period (accounting)
    clock: datetime | None = None  # latest event time seen (the scheduler's notion of now)
    seq: int = 0
    # (rows written before stop 31 also carry "seen", an event id list nothing filled or read:
    # the fleet's facts are idempotent, and spend is charged once per task row)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_defaults=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> FleetState:
        return cls.model_validate_json(data)
