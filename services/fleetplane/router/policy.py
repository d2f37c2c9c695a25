"""Routing policy: which model a task gets, and why (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from fleetplane.core.catalog import Catalog, Model, Usage
from fleetplane.core.events import TaskSpec

EXPECTED_OUTPUT_TOKENS = 500


@dataclass(frozen=True)
class Decision:
    model: Model
    reason: str
    alternatives: list[str]
    estimated_cost_usd: float


def estimate_cost(model: Model, spec: TaskSpec) -> float:
    """Before the call: ~4 characters per token for the prompt, a typical answer length."""
    chars = len(spec.prompt) + len(spec.system_prompt or "")
    usage = Usage(input_tokens=max(1, chars // 4), output_tokens=EXPECTED_OUTPUT_TOKENS)
    return model.cost(usage)


def choose(catalog: Catalog, spec: TaskSpec) -> Decision:
    """Decision order: a pinned model; then the manifest's tier; then the task type's tier."""
    if spec.model_preference == "pinned" and spec.model:
        model = catalog.model(spec.model)
        reason = f"pinned by the manifest to {model.name}"
    elif spec.tier:
        model = catalog.default_model(spec.tier)
        reason = f"tier {spec.tier} requested by the manifest"
    elif spec.task_type in catalog.task_types:
        tier = catalog.task_types[spec.task_type].tier
        model = catalog.default_model(tier)
        reason = f"task type {spec.task_type} maps to tier {tier}"
    else:
        tier = catalog.default_tier
        model = catalog.default_model(tier)
        reason = f"task type {spec.task_type} has no policy; default tier {tier}"
    alternatives = [m.name for m in catalog.models.values() if m.name != model.name]
    return Decision(model=model, reason=reason, alternatives=alternatives,
                    estimated_cost_usd=estimate_cost(model, spec))
