"""Tamper evidence for the audit log: each attempt's audit events form a hash chain.

The executor links every audit event of an attempt (ModelCall, ToolCall, WorkspaceChange, in the
order they happened) by setting its ``prev_hash`` to the hash of the previous one (empty for the
first), and reports the hash of the last one and the count on the attempt's outcome
(``TaskCompleted`` / ``TaskFailed``: ``audit_head``, ``audit_count``). ``verify`` then detects an
event that was changed, removed, inserted or reordered.

An event's hash is SHA-256 over its canonical JSON (pydantic JSON mode, keys sorted), which
includes ``prev_hash``: so it survives an Avro round trip and a ClickHouse round trip unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fleetplane.core.events import Event, ModelCall, ToolCall, WorkspaceChange

AuditEvent = ModelCall | ToolCall | WorkspaceChange
A = TypeVar("A", ModelCall, ToolCall, WorkspaceChange)


def canonical(event: Event) -> bytes:
    data = event.model_dump(mode="json")
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def event_hash(event: Event) -> str:
    return hashlib.sha256(canonical(event)).hexdigest()


@dataclass
class Chain:
    """The running chain of one attempt (not thread-safe: one attempt runs in one slot)."""

    head: str = ""
    count: int = 0

    def link(self, event: A) -> A:
        """`event` with prev_hash set to the current head; the head moves to it."""
        linked = event.model_copy(update={"prev_hash": self.head})
        self.head = event_hash(linked)
        self.count += 1
        return linked


@dataclass
class Verdict:
    ok: bool
    problems: list[str] = field(default_factory=list)


def verify(events: Sequence[AuditEvent], head: str, count: int) -> Verdict:
    """Check `events` (in recorded order) against the outcome's `head` and `count`."""
    problems: list[str] = []
    prev = ""
    for i, e in enumerate(events):
        if e.prev_hash != prev:
            problems.append(f"event {i} ({type(e).__name__} {e.event_id}): prev_hash does not "
                            "match the event before it (changed, removed or reordered)")
        prev = event_hash(e)
    if len(events) != count:
        problems.append(f"{len(events)} audit events, the outcome recorded {count}")
    if prev != head:
        problems.append("the last event's hash is not the outcome's audit_head")
    return Verdict(ok=not problems, problems=problems)
