"""Executor handler: run an admitted attempt and report what happened.

Thin for now: one model call per task (issue 5 replaces it with the agent loop). The handler is a
function of the dispatch event and a `ModelClients`; everything it did comes back as events, which
the loop publishes in one transaction with the input offset (a crash re-runs the attempt, and the
aborted transaction's ModelCall is never counted)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from fleetplane.core.catalog import Catalog
from fleetplane.core.events import (
    Event,
    ModelCall,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskStarted,
    derived_id,
)
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import Record
from fleetplane.executor.models import ModelCallError, ModelClients

log = get_logger(__name__)
MAX_OUTPUT_TOKENS = 1024


class SeenDispatches:
    """Dispatch event ids this process already ran (bounded, thread-safe).

    The coordinator is at-least-once: after a crash it may re-publish the dispatches of its last
    batch with the same event ids. Running one again would call the model twice."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def first_time(self, event_id: str) -> bool:
        with self._lock:
            if event_id in self._ids:
                return False
            self._ids[event_id] = None
            if len(self._ids) > self._capacity:
                self._ids.popitem(last=False)
            return True


def execute(catalog: Catalog, clients: ModelClients, executor_id: str, seen: SeenDispatches,
            event: Event, record: Record | None = None) -> Iterable[Event]:
    """Run one dispatched attempt. Output event ids derive from the dispatch's, so a repeat of
    the same dispatch (after a crash of this process) yields the same events, which every
    consumer deduplicates."""
    if not isinstance(event, TaskDispatched):
        return []
    if not seen.first_time(event.event_id):
        log.warning("duplicate dispatch ignored", attempt=event.attempt)
        return []
    started = time.perf_counter()
    cause = event.event_id
    out: list[Event] = [event.derive(TaskStarted, attempt=event.attempt, executor_id=executor_id,
                                     event_id=derived_id(cause, "started"))]
    model = catalog.model(event.model)
    try:
        result = clients.call(model, event.spec.prompt, event.spec.system_prompt,
                              MAX_OUTPUT_TOKENS, event.spec.temperature)
    except ModelCallError as exc:
        out.append(event.derive(
            ModelCall, event_id=derived_id(cause, "model-call-0"),
            attempt=event.attempt, call_index=0, model=model.name,
            provider=model.provider, tier=model.tier, input_tokens=0, output_tokens=0,
            cost_usd=0.0, latency_ms=exc.latency_ms, outcome=exc.kind, error=str(exc)))
        out.append(event.derive(TaskFailed, event_id=derived_id(cause, "failed"),
                                attempt=event.attempt, failure_class="model_error",
                                reason=f"{exc.kind}: {exc}", final=False))
        log.warning("attempt failed", kind=exc.kind, attempt=event.attempt)
        return out
    cost = model.cost(result.usage)
    out.append(event.derive(
        ModelCall, event_id=derived_id(cause, "model-call-0"),
        attempt=event.attempt, call_index=0, model=model.name,
        provider=model.provider, tier=model.tier,
        input_tokens=result.usage.input_tokens, output_tokens=result.usage.output_tokens,
        cache_creation_input_tokens=result.usage.cache_creation_input_tokens,
        cache_read_input_tokens=result.usage.cache_read_input_tokens,
        cost_usd=cost, latency_ms=result.latency_ms, outcome="ok",
        stop_reason=result.stop_reason))
    out.append(event.derive(
        TaskCompleted, event_id=derived_id(cause, "completed"),
        attempt=event.attempt, model=model.name, output=result.text,
        cost_usd=cost, duration_ms=int((time.perf_counter() - started) * 1000)))
    return out
