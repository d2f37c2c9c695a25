"""A stream consumer that records when each task passed each stage of the pipeline.

One background consumer (every partition assigned at its end at start; parked between reads, as
the services' consumers are) reads
tasks.accepted, tasks.routed, tasks.dispatch, tasks.outcomes and audit.model_calls:
* accepted / routed / dispatched: the record's Kafka timestamp (the producer's create time, i.e.
  when the service produced it; visible to read_committed consumers at commit),
* completed: when this consumer received the terminal record (what a user watching the stream sees),
* model calls: the raw ModelCall records per task, decoded on demand (latency_ms is the SDK call's
  wall time measured by the executor).
Values are kept raw and decoded only when a figure needs them, so recording costs little CPU while
the services are being measured.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, Message, TopicPartition

from bench.measure import percentile
from fleetplane.cli.stack import Stack
from fleetplane.core import doorbell
from fleetplane.core import events as ev
from fleetplane.core.loop import IdleBackoff
from fleetplane.core.serde import default_serde
from fleetplane.core.topics import ACCEPTED, DISPATCH, MODEL_CALLS, OUTCOMES, ROUTED

STAGES = (("accepted", ACCEPTED), ("routed", ROUTED), ("dispatched", DISPATCH),
          ("completed", OUTCOMES))
_STAGE_OF = {topic: stage for stage, topic in STAGES}
#: how often every recorded partition is probed while outcome rings come (stages other than
#: "completed" are timestamps read from the records: reading them late changes nothing)
FULL_PROBE_S = 0.25


class StageRecorder:
    """Records stage times (epoch seconds) per task id, from the moment `start()` returns."""

    def __init__(self, stack: Stack) -> None:
        self.settings = stack.settings()
        self.stages: dict[str, dict[str, float]] = {stage: {} for stage, _ in STAGES}
        self._outcomes: dict[str, bytes] = {}
        self._model_calls: dict[str, list[bytes]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.tracked: set[str] = set()
        """Every task a batch submitted (so a batch can tell how many earlier ones are left)."""
        self._thread = threading.Thread(target=self._run, name="stage-recorder", daemon=True)
        #: monotonic time of the last probe of every partition after which all were at their
        #: end: what was committed before it has been recorded
        self._synced_at = 0.0

    def start(self, timeout_s: float = 60.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("the stage recorder could not assign its partitions")

    def _assign_at_end(self, c: Consumer) -> None:
        """Every partition of the recorded topics, from its end now (records from then on)."""
        topics = [*_STAGE_OF, MODEL_CALLS]
        meta = c.list_topics(timeout=30)
        parts = []
        for topic in topics:
            for p in meta.topics[topic].partitions:
                high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
                parts.append(TopicPartition(topic, p, high))
        c.assign(parts)

    def _run(self) -> None:
        # parked between reads as the services' consumers are (core.loop.IdleBackoff, woken by
        # the services' doorbell rings): a consumer left assigned fetches back to back on the
        # embedded broker, which answers empty fetches at once (measured: most of a core
        # between this process and the broker, taken from the services being measured)
        c = Consumer({**self.settings.consumer_config(f"bench-rec-{uuid.uuid4().hex[:8]}"),
                      "enable.auto.commit": False, "enable.partition.eof": True})
        # rung by the executor's commits only: "completed" is the receipt time of the outcome;
        # the other stages are the records' timestamps, so their topics are read by the
        # periodic probe (FULL_PROBE_S) and `_sync` waits for one after what it asks about
        bell = (doorbell.listener(self.settings.kafka_bootstrap, [OUTCOMES])
                if self.settings.handoff_doorbell else None)
        try:
            self._assign_at_end(c)
            self._ready.set()
            idle = IdleBackoff(c, self.settings.idle_backoff_s, self.settings.idle_probe_s,
                               bell=bell, full_probe_s=FULL_PROBE_S)
            while not self._stop.is_set():
                # the first record with a timeout, then what is fetched already: consume(n, t)
                # waits the whole timeout unless n records come, which added up to 100 ms to
                # every "completed" time (the receipt time of the outcome)
                first = idle.poll(0.1)
                now = time.time()
                msgs = [] if first is None else [first, *c.consume(1999, 0)]
                for m in msgs[1:]:
                    idle.saw(m)
                self._record(msgs, now)
                if idle.idle:  # every partition read to its end as of the last full probe
                    self._synced_at = idle.full_probe_at
        finally:
            c.close()
            if bell is not None:
                bell.close()

    def _record(self, msgs: list[Message], now: float) -> None:
        with self._lock:
            for m in msgs:
                if m.error():
                    continue
                key = (m.key() or b"").decode()
                topic = m.topic()
                if topic == MODEL_CALLS:
                    self._model_calls[key].append(m.value() or b"")
                    continue
                stage = _STAGE_OF[topic or ""]
                times = self.stages[stage]
                if key in times:
                    continue
                if stage == "completed":
                    times[key] = now
                    self._outcomes[key] = m.value() or b""
                else:
                    ts_type, ts = m.timestamp()
                    times[key] = ts / 1000 if ts_type != TIMESTAMP_NOT_AVAILABLE else now

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)

    # -- reading ------------------------------------------------------------------------------
    def _sync(self, timeout_s: float = 5.0) -> None:
        """Wait until what was committed before now has been read (the topics no ring wakes
        the recorder for are read by the periodic probe)."""
        asked = time.monotonic()
        deadline = asked + timeout_s
        while self._synced_at < asked and time.monotonic() < deadline \
                and self._thread.is_alive():
            time.sleep(0.02)

    def completed(self, task_ids: set[str]) -> int:
        with self._lock:
            done = self.stages["completed"]
            return sum(1 for t in task_ids if t in done)

    def pending(self) -> int:
        """Tracked tasks not in a terminal state yet."""
        return len(self.tracked) - self.completed(self.tracked)

    def wait_done(self, task_ids: set[str], timeout_s: float) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.completed(task_ids) >= len(task_ids):
                return True
            time.sleep(0.2)
        return self.completed(task_ids) >= len(task_ids)

    def snapshot(self, task_ids: set[str]) -> dict[str, dict[str, float]]:
        self._sync()
        with self._lock:
            return {stage: {t: ts for t, ts in times.items() if t in task_ids}
                    for stage, times in self.stages.items()}

    def outcome_kinds(self, task_ids: set[str]) -> dict[str, int]:
        serde = default_serde()
        with self._lock:
            raw = [v for t, v in self._outcomes.items() if t in task_ids]
        kinds: dict[str, int] = {}
        for value in raw:
            name = type(serde.decode(value)).__name__
            kinds[name] = kinds.get(name, 0) + 1
        return kinds

    def model_calls(self, task_ids: set[str]) -> dict[str, list[ev.ModelCall]]:
        serde = default_serde()
        self._sync()
        with self._lock:
            raw = {t: list(v) for t, v in self._model_calls.items() if t in task_ids}
        out: dict[str, list[ev.ModelCall]] = {}
        for task_id, values in raw.items():
            calls = [e for e in (serde.decode(v) for v in values) if isinstance(e, ev.ModelCall)]
            out[task_id] = calls
        return out


def ratios(recorder: StageRecorder, batch: dict[str, Any]) -> dict[str, Any]:
    """Per task: submit->completed and dispatched->completed over the task's model time."""
    ids: set[str] = batch["task_ids"]
    calls = recorder.model_calls(ids)
    stages = recorder.snapshot(ids)
    model_ms: dict[str, float] = {t: sum(c.latency_ms for c in cs) for t, cs in calls.items() if cs}
    submitted: dict[str, float] = batch["_submitted"]
    end_to_end = [(stages["completed"][t] - submitted[t]) * 1000 / model_ms[t]
                  for t in model_ms if t in stages["completed"] and t in submitted]
    after_dispatch = [(stages["completed"][t] - stages["dispatched"][t]) * 1000 / model_ms[t]
                      for t in model_ms
                      if t in stages["completed"] and t in stages["dispatched"]]
    n_calls = sum(len(cs) for cs in calls.values())
    model_values = list(model_ms.values())
    return {
        "model_calls": n_calls,
        "tasks_with_calls": len(model_ms),
        "model_ms_per_task": {"p50": round(percentile(model_values, 50), 1),
                              "p99": round(percentile(model_values, 99), 1)},
        "e2e_over_model": {"p50": round(percentile(end_to_end, 50), 2),
                           "p99": round(percentile(end_to_end, 99), 2)},
        "dispatched_to_completed_over_model": {
            "p50": round(percentile(after_dispatch, 50), 2),
            "p99": round(percentile(after_dispatch, 99), 2)},
    }
