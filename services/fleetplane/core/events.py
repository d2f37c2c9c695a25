"""Pydantic mirrors of the Avro schemas in schemas/ (the schemas are the source of truth).

tests/unit/test_schemas_match_models.py proves each model agrees with its schema field by field.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from functools import cache
from hashlib import sha1
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field


def new_event_id() -> str:
    return uuid.uuid4().hex


_DERIVED = uuid.UUID("6f1d3c52-8a0e-4b7e-9a55-0c2f7f1e9d10")
_DERIVED_BYTES = _DERIVED.bytes


def derived_id(cause_event_id: str, tag: str) -> str:
    """A deterministic event id for the event `tag` derived from `cause_event_id`.

    Reprocessing the same input yields the same ids, so a re-published output is recognised as
    a duplicate by every consumer (handlers are idempotent by event_id).

    The hex of ``uuid.uuid5(_DERIVED, f"{cause_event_id}/{tag}")``, computed without building
    the UUID object (a fifth of the CPU; every service derives several ids per task)."""
    digest = bytearray(sha1(_DERIVED_BYTES + f"{cause_event_id}/{tag}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return digest.hex()


def utcnow_ms() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=(now.microsecond // 1000) * 1000)


E = TypeVar("E", bound="Event")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


R = TypeVar("R", bound=Record)


@cache
def _nested(cls: type[Record]) -> tuple[tuple[str, type[Record], bool], ...]:
    """The fields of `cls` holding records: (name, record class, is a list)."""
    out: list[tuple[str, type[Record], bool]] = []
    for name, info in cls.model_fields.items():
        ann = info.annotation
        for arg in (ann, *get_args(ann)):
            if isinstance(arg, type) and issubclass(arg, Record):
                out.append((name, arg, False))
                break
            inner = get_args(arg)
            if get_origin(arg) is list and inner and isinstance(inner[0], type) \
                    and issubclass(inner[0], Record):
                out.append((name, inner[0], True))
                break
    return tuple(out)


@cache
def _field_names(cls: type[Record]) -> frozenset[str]:
    return frozenset(cls.model_fields)


def trusted(cls: type[R], fields: dict[str, Any]) -> R:
    """A record built from `fields` without pydantic validation, for fields an Avro reader
    decoded with the record's schema (types, unions and defaults are the schema's; the models
    mirror the schemas field by field, tests/unit/test_schemas_match_models.py). About half
    the cost of model_validate on the loop's hot path (docs/benchmarks.md, "Profiles"). Takes
    ownership of `fields`. Anything else (HTTP bodies, YAML) goes through validation."""
    for name, sub, many in _nested(cls):
        value = fields.get(name)
        if value is not None:
            fields[name] = [trusted(sub, v) for v in value] if many else trusted(sub, value)
    if fields.keys() != _field_names(cls):
        return cls.model_construct(**fields)  # fills defaults (drops what the model lacks)
    obj = cls.__new__(cls)
    object.__setattr__(obj, "__dict__", fields)
    object.__setattr__(obj, "__pydantic_fields_set__", set(fields))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


class TaskSpec(Record):
    name: str
    task_type: str
    prompt: str
    system_prompt: str | None = None
    repository: str | None = None
    ref: str = "main"
    write_scope: list[str] = Field(default_factory=list)
    depends_on: list[str] = Field(default_factory=list)
    priority: str = "normal"
    model_preference: str = "auto"
    tier: str | None = None
    model: str | None = None
    allowed_tools: list[str] = Field(default_factory=list)
    max_cost_usd: float | None = None
    max_turns: int = 20
    timeout_s: int = 600
    max_attempts: int = 3
    failure_policy: str = "retry"
    temperature: float = 0.0
    labels: dict[str, str] = Field(default_factory=dict)
    failure_policies: dict[str, str] = Field(default_factory=dict)
    conflict_policy: str = "rollback"
    allowed_commands: list[str] = Field(default_factory=list)
    context_files: list[str] = Field(default_factory=list)
    parent_task_id: str | None = None
    root_task_id: str | None = None
    depth: int = 0


class FileChange(Record):
    path: str
    added: int
    removed: int


class Event(Record):
    """The envelope every event carries."""

    event_id: str = Field(default_factory=new_event_id)
    task_id: str
    team: str
    occurred_at: datetime = Field(default_factory=utcnow_ms)
    schema_version: int = 1
    causation_id: str | None = None

    def derive(self, cls: type[E], **fields: Any) -> E:
        """A new event of type `cls` caused by this one (same task and team)."""
        base: dict[str, Any] = {"task_id": self.task_id, "team": self.team,
                                "causation_id": self.event_id}
        base.update(fields)
        return cls(**base)


class TaskSubmitted(Event):
    spec: TaskSpec
    source: str = "kafka"
    idempotency_key: str | None = None


class TaskAccepted(Event):
    spec: TaskSpec
    source: str = "kafka"


class TaskRejected(Event):
    reason: str
    field: str | None = None
    source: str = "kafka"


class TaskRouted(Event):
    spec: TaskSpec
    attempt: int
    model: str
    provider: str
    tier: str
    reason: str
    alternatives: list[str] = Field(default_factory=list)
    estimated_cost_usd: float = 0.0


class TaskDispatched(Event):
    spec: TaskSpec
    attempt: int
    model: str
    provider: str
    tier: str
    leased_paths: list[str] = Field(default_factory=list)
    action: str = "run"
    inputs: dict[str, str] = Field(default_factory=dict)


class TaskHeld(Event):
    reason: str
    held_by: str | None = None
    paths: list[str] = Field(default_factory=list)
    kind: str = ""
    attempt: int = 0


class TaskStarted(Event):
    attempt: int
    executor_id: str
    slot: int = 0
    lease_ms: int = 0


class TaskHeartbeat(Event):
    attempt: int
    executor_id: str
    lease_ms: int = 0


class TaskCompleted(Event):
    attempt: int
    model: str
    output: str
    cost_usd: float
    duration_ms: int
    cached: bool = False
    audit_head: str = ""
    audit_count: int = 0


class TaskFailed(Event):
    attempt: int
    failure_class: str
    reason: str
    final: bool = False
    cost_usd: float = 0.0
    audit_head: str = ""
    audit_count: int = 0


class TaskRetrying(Event):
    attempt: int
    delay_ms: int
    reason: str


class TaskEscalated(Event):
    attempt: int
    from_tier: str
    to_tier: str
    reason: str
    spec: TaskSpec | None = None


class TaskAbandoned(Event):
    attempt: int
    reason: str


class TaskCancelled(Event):
    reason: str
    requested_by: str = ""


class TaskRolledBack(Event):
    attempt: int
    reason: str
    reverted_commit: str | None = None
    files: list[str] = Field(default_factory=list)


class ModelCall(Event):
    attempt: int
    call_index: int
    model: str
    provider: str
    tier: str
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float
    latency_ms: float
    outcome: str
    error: str | None = None
    stop_reason: str | None = None
    prev_hash: str = ""


class ToolCall(Event):
    attempt: int
    call_index: int
    tool: str
    arguments: str
    outcome: str
    result_summary: str = ""
    duration_ms: float = 0.0
    prev_hash: str = ""


class WorkspaceChange(Event):
    attempt: int
    repository: str
    branch: str
    commit: str | None = None
    files: list[FileChange] = Field(default_factory=list)
    prev_hash: str = ""


class TaskConflict(Event):
    attempt: int
    repository: str
    paths: list[str] = Field(default_factory=list)
    conflicting_task_id: str | None = None
    reason: str
    policy: str = "rollback"


class ExecutorUtilization(Event):
    executor_id: str
    slot: int
    window_start: datetime
    window_s: float
    model_s: float = 0.0
    tool_s: float = 0.0
    busy_s: float = 0.0
    idle_s: float = 0.0
    attempts: int = 0


class BudgetStatus(Event):
    period: str
    budget_usd: float
    spent_usd: float
    remaining_usd: float
    state: str


class Alert(Event):
    severity: str
    kind: str
    message: str
    metric: str | None = None
    value: float | None = None
    baseline: float | None = None


class ControlCommand(Event):
    command: str
    requested_by: str = ""
    reason: str = ""


class DeadLetter(Event):
    service: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None = None
    payload: bytes
    headers: dict[str, bytes] = Field(default_factory=dict)
    error_class: str
    reason: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        TaskSubmitted, TaskAccepted, TaskRejected, TaskRouted, TaskDispatched, TaskHeld,
        TaskStarted, TaskHeartbeat, TaskCompleted, TaskFailed, TaskRetrying, TaskEscalated,
        TaskAbandoned, TaskCancelled, TaskRolledBack, ModelCall, ToolCall, WorkspaceChange,
        BudgetStatus, Alert, ControlCommand, DeadLetter, TaskConflict, ExecutorUtilization,
    )
}

TERMINAL_TYPES: tuple[type[Event], ...] = (
    TaskCompleted, TaskAbandoned, TaskCancelled, TaskRolledBack,
)


def is_terminal(event: Event) -> bool:
    """True when the event puts its task into a terminal state."""
    if isinstance(event, TaskFailed):
        return event.final
    return isinstance(event, TERMINAL_TYPES)
