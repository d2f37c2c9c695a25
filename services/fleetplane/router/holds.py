"""Budget holds as a table on a compacted topic (router.holds), so that a restart finds every
held task however long ago it was held, without reading the task topics from their start.

A task held for its team's budget waits until a budget status shows money again: a monthly
budget can hold it for weeks, longer than the router's start-up lookback
(``FLEETPLANE_ROUTER_REBUILD_LOOKBACK_S``, fleetplane.router.rebuild) reads. So each held task
is a record keyed by its id, holding what a release needs (team, attempt, spec, the models of
its earlier attempts, the tier an escalation asked for), written in the loop's transaction
that holds it (the ``before_commit`` hook, as router.stats), and a tombstone in the
transaction that routes or ends it. The topic holds exactly the committed holds; compaction
keeps one record per held task.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fleetplane.core import events as ev
from fleetplane.core.loop import RawRecord
from fleetplane.router.state import RouterState, TaskRecord

HOLDS_TOPIC = "router.holds"
WRITER_HEADER = "replica"  # the replica that wrote a record or tombstone
# on the tombstone of a hold that ended routed: "<attempt>:<model>", so that a replica whose
# task another replica released knows its model and counts its outcome
ROUTED_HEADER = "routed"


def pending(state: RouterState, writer: str = "") -> list[RawRecord]:
    """The records of the holds that began or ended since the last call: a record per task
    still held, a tombstone per task whose hold is over (`writer`: this replica's name)."""
    out = []
    for task_id in sorted(state.hold_changes):
        rec = state.tasks.get(task_id)
        if rec is not None and rec.waiting:
            out.append(hold_record(task_id, rec, writer))
        else:  # routed (its held attempt has a model) or ended
            routed = (rec.held, rec.models[rec.held]) if rec is not None \
                and rec.held is not None and rec.held in rec.models else None
            out.append(tombstone(task_id, writer, routed))
    state.hold_changes.clear()
    return out


def apply_peer(state: RouterState, task_id: str, value: bytes | None,
               routed: bytes | None = None) -> None:
    """Another replica's record (or tombstone) of a hold, followed live: every replica knows
    every hold, so the replica that reads the team's budget status releases the team's held
    tasks whichever replica held them. A hold that ended elsewhere is dropped here, unless
    the tombstone says the held attempt was routed (`routed`, the ROUTED_HEADER): the task
    stays, with that attempt's model, so that its outcome (read by the replica whose
    partition carries the task) is counted and a later escalation knows the earlier models."""
    rec = state.tasks.get(task_id)
    if value is None:
        if rec is not None and rec.waiting:
            attempt, _, model = (routed or b"").decode().partition(":")
            if model and attempt.isdigit() and int(attempt) == rec.held:
                rec.models[rec.held] = model  # routed by the other replica
            else:
                del state.tasks[task_id]  # ended (or routed, as an older replica wrote it)
    elif rec is None:  # (a task known here already: this replica's own view wins)
        state.restore_hold(*parse(json.loads(value)))


def hold_record(task_id: str, rec: TaskRecord, writer: str = "") -> RawRecord:
    """The record of a task still held."""
    value = {"task_id": task_id, "team": rec.team, "attempt": rec.held,
             "held_at": rec.held_at.isoformat() if rec.held_at else None,
             "spec": rec.spec.model_dump(mode="json") if rec.spec is not None else None,
             "models": {str(a): m for a, m in rec.models.items()},
             "counted": sorted(rec.counted),
             "escalations": {str(a): t for a, t in rec.escalations.items()}}
    return RawRecord(HOLDS_TOPIC, task_id.encode(),
                     json.dumps(value, separators=(",", ":")).encode(), partition=0,
                     headers=((WRITER_HEADER, writer.encode()),))


def tombstone(task_id: str, writer: str = "",
              routed: tuple[int, str] | None = None) -> RawRecord:
    """The hold of `task_id` is over: routed (`routed`: the attempt and its model), or the
    task ended."""
    headers: tuple[tuple[str, bytes], ...] = ((WRITER_HEADER, writer.encode()),)
    if routed is not None:
        headers += ((ROUTED_HEADER, f"{routed[0]}:{routed[1]}".encode()),)
    return RawRecord(HOLDS_TOPIC, task_id.encode(), None, partition=0, headers=headers)


def parse(value: dict[str, Any]) -> tuple[str, TaskRecord]:
    """A record as the task id and its TaskRecord (ValueError, KeyError or TypeError on a
    malformed record)."""
    held_at = value.get("held_at")
    spec = value.get("spec")
    rec = TaskRecord(
        team=str(value["team"]),
        spec=ev.TaskSpec.model_validate(spec) if spec is not None else None,
        models={int(a): str(m) for a, m in dict(value.get("models") or {}).items()},
        counted={int(a) for a in value.get("counted") or ()},
        escalations={int(a): str(t) for a, t in dict(value.get("escalations") or {}).items()},
        held=int(value["attempt"]),
        held_at=datetime.fromisoformat(held_at) if held_at else None)
    return str(value["task_id"]), rec
