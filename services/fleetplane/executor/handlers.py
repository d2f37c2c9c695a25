"""Executor handler: run an admitted attempt and report what happened.

Thin for now: one model call per task (issue 5 replaces it with the agent loop). The handler is a
function of the dispatch event and a `ModelClients`; everything it did comes back as events, which
the loop publishes in one transaction with the input offset (a crash re-runs the attempt, and the
aborted transaction's ModelCall is never counted)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from fleetplane.core.catalog import Catalog
from fleetplane.core.events import (
    Event,
    ModelCall,
    TaskCompleted,
    TaskDispatched,
    TaskFailed,
    TaskStarted,
)
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import Record
from fleetplane.executor.models import ModelCallError, ModelClients

log = get_logger(__name__)
MAX_OUTPUT_TOKENS = 1024


def execute(catalog: Catalog, clients: ModelClients, executor_id: str, event: Event,
            record: Record | None = None) -> Iterable[Event]:
    if not isinstance(event, TaskDispatched):
        return []
    started = time.perf_counter()
    out: list[Event] = [event.derive(TaskStarted, attempt=event.attempt, executor_id=executor_id)]
    model = catalog.model(event.model)
    try:
        result = clients.call(model, event.spec.prompt, event.spec.system_prompt,
                              MAX_OUTPUT_TOKENS, event.spec.temperature)
    except ModelCallError as exc:
        out.append(event.derive(
            ModelCall, attempt=event.attempt, call_index=0, model=model.name,
            provider=model.provider, tier=model.tier, input_tokens=0, output_tokens=0,
            cost_usd=0.0, latency_ms=exc.latency_ms, outcome=exc.kind, error=str(exc)))
        out.append(event.derive(TaskFailed, attempt=event.attempt, failure_class="model_error",
                                reason=f"{exc.kind}: {exc}", final=False))
        log.warning("attempt failed", kind=exc.kind, attempt=event.attempt)
        return out
    cost = model.cost(result.usage)
    out.append(event.derive(
        ModelCall, attempt=event.attempt, call_index=0, model=model.name,
        provider=model.provider, tier=model.tier,
        input_tokens=result.usage.input_tokens, output_tokens=result.usage.output_tokens,
        cache_creation_input_tokens=result.usage.cache_creation_input_tokens,
        cache_read_input_tokens=result.usage.cache_read_input_tokens,
        cost_usd=cost, latency_ms=result.latency_ms, outcome="ok",
        stop_reason=result.stop_reason))
    out.append(event.derive(
        TaskCompleted, attempt=event.attempt, model=model.name, output=result.text,
        cost_usd=cost, duration_ms=int((time.perf_counter() - started) * 1000)))
    return out
