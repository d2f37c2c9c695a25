"""Topic catalog (infra/topics.yaml), which event goes to which topic, and topic creation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from fleetplane.core import events as ev

SUBMITTED = "tasks.submitted"
ACCEPTED = "tasks.accepted"
ROUTED = "tasks.routed"
DISPATCH = "tasks.dispatch"
LIFECYCLE = "tasks.lifecycle"
OUTCOMES = "tasks.outcomes"
MODEL_CALLS = "audit.model_calls"
TOOL_CALLS = "audit.tool_calls"
WORKSPACE = "workspace.changes"
CONTROL = "fleet.control"
BUDGET = "fleet.budget"
ALERTS = "fleet.alerts"
DLQ = "fleet.dlq"
UTILIZATION = "fleet.utilization"

_TOPIC_OF: dict[type[ev.Event], str] = {
    ev.TaskSubmitted: SUBMITTED,
    ev.TaskAccepted: ACCEPTED,
    ev.TaskRouted: ROUTED,
    ev.TaskDispatched: DISPATCH,
    ev.TaskRejected: LIFECYCLE,
    ev.TaskHeld: LIFECYCLE,
    ev.TaskStarted: LIFECYCLE,
    ev.TaskHeartbeat: LIFECYCLE,
    ev.TaskRetrying: LIFECYCLE,
    ev.TaskEscalated: LIFECYCLE,
    ev.TaskCompleted: OUTCOMES,
    ev.TaskAbandoned: OUTCOMES,
    ev.TaskCancelled: OUTCOMES,
    ev.TaskRolledBack: OUTCOMES,
    ev.ModelCall: MODEL_CALLS,
    ev.ToolCall: TOOL_CALLS,
    ev.WorkspaceChange: WORKSPACE,
    ev.TaskConflict: LIFECYCLE,
    ev.ExecutorUtilization: UTILIZATION,
    ev.ControlCommand: CONTROL,
    ev.BudgetStatus: BUDGET,
    ev.Alert: ALERTS,
    ev.DeadLetter: DLQ,
}


def topic_for(event: ev.Event) -> str:
    """The topic an event is published to (terminal failures go to tasks.outcomes)."""
    if isinstance(event, ev.TaskFailed):
        return OUTCOMES if event.final else LIFECYCLE
    return _TOPIC_OF[type(event)]


def key_for(event: ev.Event) -> bytes:
    """Task topics are keyed by task id; budget and alerts by team; utilization by executor."""
    if isinstance(event, ev.BudgetStatus | ev.Alert):
        return event.team.encode()
    if isinstance(event, ev.ExecutorUtilization):
        return event.executor_id.encode()
    return event.task_id.encode()


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    partitions: int
    replication_factor: int
    retention_ms: int
    cleanup_policy: str
    doc: str = ""
    kind: str = "events"  # "events": fleetplane Avro events; "internal": Faust changelogs etc.
    #: roll a segment this often (None: the broker's default, 7 days): a compacted topic is
    #: compacted only in closed segments
    segment_ms: int | None = None

    def config(self) -> dict[str, str]:
        config = {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}
        if self.segment_ms is not None:
            config["segment.ms"] = str(self.segment_ms)
        return config


def load_topics(path: Path) -> list[TopicSpec]:
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    defaults = raw.get("defaults", {})
    specs = []
    for t in raw["topics"]:
        specs.append(
            TopicSpec(
                name=t["name"],
                key=t.get("key", "task_id"),
                partitions=int(t.get("partitions", defaults.get("partitions", 6))),
                replication_factor=int(
                    t.get("replication_factor", defaults.get("replication_factor", 1))
                ),
                retention_ms=int(t.get("retention_ms", -1)),
                cleanup_policy=str(t.get("cleanup_policy", "delete")),
                doc=str(t.get("doc", "")),
                kind=str(t.get("kind", "events")),
                segment_ms=int(t["segment_ms"]) if "segment_ms" in t else None,
            )
        )
    return specs


def event_topics(specs: list[TopicSpec]) -> list[str]:
    """Topics that carry fleetplane events (internal changelog topics excluded)."""
    return [s.name for s in specs if s.kind == "events"]


def ensure_topics(
    client_config: dict[str, Any], specs: list[TopicSpec], timeout_s: float = 30.0
) -> list[str]:
    """Create missing topics with their partition counts; returns the names created.

    Existing topics are left alone, but a partition count lower than declared is an error
    (co-partitioning would silently break)."""
    admin = AdminClient(dict(client_config))
    existing = admin.list_topics(timeout=timeout_s).topics
    for spec in specs:
        have = existing.get(spec.name)
        if have is not None and len(have.partitions) < spec.partitions:
            raise RuntimeError(
                f"topic {spec.name} has {len(have.partitions)} partitions, "
                f"infra/topics.yaml declares {spec.partitions}"
            )
    new = [
        NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor,
                 config=s.config())
        for s in specs
        if s.name not in existing
    ]
    if not new:
        return []
    futures = admin.create_topics(new, request_timeout=timeout_s)
    created = []
    for name, fut in futures.items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return created
