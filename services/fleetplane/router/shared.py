"""Shared, durable router state: the learned statistics on a compacted topic (router.stats).

Every router replica publishes *its own contribution* to each (task type, model) cell of the
statistics: the absolute counts of the outcomes it counted (successes, failures, cost, and the
discounted counts of the posterior), one record per changed cell, keyed
``stats|<replica>|<task type>|<model>``, written as a RawRecord in the loop's transaction with
the input offsets (exactly what the replica's committed inputs counted). The service publishes
once per transaction (the loop's ``before_commit`` hook, ``Router.shared_records``): one record
per cell changed by the whole batch, not one per outcome (a record per outcome doubled the
router's CPU and added to the broker's); since each record holds the cell's absolute counts,
the last one of a transaction says everything the earlier ones would have. An aborted
transaction marks every cell changed again (``Router.on_abort``).
Every replica follows the topic (fleetplane.core.follower, outside the consumer group) and
sums the latest contribution of every replica: the replicas learn from all outcomes, whichever
replica consumed them. Because each record carries a replica's absolute counts for one cell,
applying a record twice, or an older one after it has been superseded by compaction, changes
nothing (a state-based counter per replica: no delta can be lost or counted twice).

The topic is compacted: the latest record per key is the snapshot, the records since the last
compaction are the deltas. A restarted replica reads it from the beginning (read_committed) and
has the fleet's statistics at once: its own cells restore its contribution, the others' are
summed; the outcomes in the history that the group's committed offsets cover are then not
counted again (fleetplane.router.rebuild). The per-prompt model's weights (signal.py) of each
replica are snapshotted under ``signal|<replica>|<model>`` every SIGNAL_EVERY updates; a
replica restores only its own (logistic regressions trained on different outcomes are not
summable; each replica's keeps learning from the outcomes it consumes).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from typing import Any

import numpy as np

from fleetplane.core.logging import get_logger
from fleetplane.core.loop import RawRecord
from fleetplane.router.signal import ModelWeights, PromptSignal
from fleetplane.router.stats import Cell, OutcomeStats

log = get_logger(__name__)

STATS_TOPIC = "router.stats"
SIGNAL_EVERY = 100  # a model's per-prompt weights are snapshotted every this many updates


def stats_record(replica: str, task_type: str, model: str, cell: Cell) -> RawRecord:
    value = {"kind": "stats", "replica": replica, "task_type": task_type, "model": model,
             "cell": list(cell)}
    return RawRecord(STATS_TOPIC, f"stats|{replica}|{task_type}|{model}".encode(),
                     json.dumps(value, separators=(",", ":")).encode(), partition=0)


def signal_record(replica: str, model: str, w: ModelWeights) -> RawRecord:
    value = {"kind": "signal", "replica": replica, "model": model,
             "w": w.w.tolist(), "g2": w.g2.tolist(), "bias": w.bias, "bias_g2": w.bias_g2,
             "by_type": w.by_type, "updates": w.updates}
    return RawRecord(STATS_TOPIC, f"signal|{replica}|{model}".encode(),
                     json.dumps(value, separators=(",", ":")).encode(), partition=0)


def pending_records(replica: str, stats: OutcomeStats, signal: PromptSignal,
                    published_signal: dict[str, int]) -> list[RawRecord]:
    """This replica's cells changed since the last call, and the per-prompt weights of models
    with SIGNAL_EVERY updates since their last snapshot."""
    out = [stats_record(replica, t, m, stats.own[(t, m)].cell()) for t, m in sorted(stats.dirty)]
    stats.dirty.clear()
    for model, w in sorted(signal.models.items()):
        if w.updates - published_signal.get(model, 0) >= SIGNAL_EVERY:
            out.append(signal_record(replica, model, w))
            published_signal[model] = w.updates
    return out


def apply_record(replica: str, value: dict[str, Any], stats: OutcomeStats,
                 signal: PromptSignal | None, *, restoring: bool) -> bool:
    """One record of the topic: another replica's cell is summed; this replica's own cell and
    weights are restored only at start-up (`restoring`; live, the replica knows them already).
    Returns whether it changed anything. Malformed records raise ValueError."""
    kind = value.get("kind")
    src = str(value["replica"])
    if kind == "stats":
        raw = value["cell"]
        if not isinstance(raw, list) or len(raw) != 5:
            raise ValueError("cell: expected 5 numbers")
        cell: Cell = (int(raw[0]), int(raw[1]), float(raw[2]), float(raw[3]), float(raw[4]))
        t, m = str(value["task_type"]), str(value["model"])
        if src != replica:
            stats.set_peer(src, t, m, cell)
            return True
        if restoring:
            stats.restore_own(t, m, cell)
            return True
        return False
    if kind == "signal":
        if src != replica or not restoring or signal is None:
            return False
        w = ModelWeights(w=np.asarray(value["w"], dtype=np.float32),
                         g2=np.asarray(value["g2"], dtype=np.float32),
                         bias=float(value["bias"]), bias_g2=float(value["bias_g2"]),
                         by_type={str(k): [float(x) for x in v]
                                  for k, v in dict(value["by_type"]).items()},
                         updates=int(value["updates"]))
        signal.models[str(value["model"])] = w
        return True
    raise ValueError(f"kind: {kind!r} is not stats or signal")


class PeerInbox:
    """Records the follower thread reads, applied under the router's lock (handlers.Router):
    at once by the follower's thread, and before each event by the loop's."""

    def __init__(self) -> None:
        self._queue: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self.applied = 0
        self.malformed = 0

    def put(self, value: dict[str, Any]) -> None:
        with self._lock:
            self._queue.append(value)

    def drain(self, replica: str, stats: OutcomeStats) -> int:
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
        n = 0
        for value in items:
            try:
                n += apply_record(replica, value, stats, None, restoring=False)
            except (KeyError, ValueError, TypeError) as exc:
                self.malformed += 1
                log.warning("router.stats record ignored", error=str(exc))
        self.applied += n
        return n
