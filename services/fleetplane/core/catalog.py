"""The model catalog (infra/catalog.yaml) and prices.

Prices come from litellm's cost map (offline); models litellm does not know carry explicit prices
in the catalog. Cost is always computed from the usage a provider reported.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

PER_MTOK = 1_000_000


@dataclass(frozen=True)
class Prices:
    """USD per token."""

    input: float
    output: float
    cache_write: float
    cache_read: float


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


@dataclass(frozen=True)
class Model:
    name: str
    tier: str
    provider: str
    prices: Prices
    context_window: int
    tool_use: bool
    default_for_tier: bool = False
    fallback: str | None = None  # the executor's fallback model after retries (issue 5)

    def cost(self, usage: Usage) -> float:
        p = self.prices
        return (usage.input_tokens * p.input + usage.output_tokens * p.output
                + usage.cache_creation_input_tokens * p.cache_write
                + usage.cache_read_input_tokens * p.cache_read)


@dataclass(frozen=True)
class TaskTypePolicy:
    """Routing and failure policy of one task type (catalog.yaml `task_types`).

    tier: the tier the rule-based policy picks; quality_target: the success rate the learned
    policy must expect of a model before it may pick it (0-1); failure_policy / failure_policies:
    the default policy, and per failure class, when the manifest names none for that class."""

    tier: str
    quality_target: float = 0.8
    failure_policy: str | None = None
    failure_policies: dict[str, str] = field(default_factory=dict)
    quality_share: float | None = None  # the router's q: success >= q x the best model's


def _task_type(name: str, raw: Any) -> TaskTypePolicy:
    if isinstance(raw, str):  # shorthand: `summarize: small`
        return TaskTypePolicy(tier=raw)
    if not isinstance(raw, dict) or "tier" not in raw:
        raise ValueError(f"task type {name!r}: give a tier, or a mapping with `tier`")
    unknown = set(raw) - {"tier", "quality_target", "failure_policy", "failure_policies",
                          "quality_share"}
    if unknown:
        raise ValueError(f"task type {name!r}: unknown keys {sorted(unknown)}")
    target = float(raw.get("quality_target", 0.8))
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"task type {name!r}: quality_target must be 0-1")
    share = raw.get("quality_share")
    if share is not None and not 0.0 <= float(share) <= 1.0:
        raise ValueError(f"task type {name!r}: quality_share must be 0-1")
    return TaskTypePolicy(tier=str(raw["tier"]), quality_target=target,
                          failure_policy=raw.get("failure_policy"),
                          failure_policies=dict(raw.get("failure_policies") or {}),
                          quality_share=None if share is None else float(share))


@dataclass(frozen=True)
class Catalog:
    tiers: list[str]
    default_tier: str
    models: dict[str, Model]
    task_types: dict[str, TaskTypePolicy] = field(default_factory=dict)

    def model(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"model {name!r} is not in the catalog") from None

    def default_model(self, tier: str) -> Model:
        candidates = [m for m in self.models.values() if m.tier == tier]
        if not candidates:
            raise KeyError(f"no model in tier {tier!r}")
        for m in candidates:
            if m.default_for_tier:
                return m
        return candidates[0]

    def tier_above(self, tier: str) -> str | None:
        i = self.tiers.index(tier)
        return self.tiers[i + 1] if i + 1 < len(self.tiers) else None


@lru_cache(maxsize=1)
def _litellm_cost_map() -> dict[str, Any]:
    """litellm's bundled cost map, read as the file the package ships (what `litellm.model_cost`
    holds with LITELLM_LOCAL_MODEL_COST_MAP=True) without importing litellm: the import takes
    seconds, 1-2 minutes on a loaded machine, and held up every executor start (issue 13)."""
    spec = importlib.util.find_spec("litellm")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "model_prices_and_context_window_backup.json"
        if path.is_file():
            loaded: dict[str, Any] = json.loads(path.read_bytes())
            return loaded
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm  # a layout without the bundled file: ask litellm itself

    return dict(litellm.model_cost)


def _litellm_prices(name: str) -> tuple[Prices, int, bool] | None:
    info: dict[str, Any] | None = _litellm_cost_map().get(name)
    if not info or info.get("input_cost_per_token") is None:
        return None
    inp = float(info["input_cost_per_token"])
    prices = Prices(
        input=inp,
        output=float(info.get("output_cost_per_token") or 0.0),
        cache_write=float(info.get("cache_creation_input_token_cost") or inp),
        cache_read=float(info.get("cache_read_input_token_cost") or inp),
    )
    window = int(info.get("max_input_tokens") or 128_000)
    return prices, window, bool(info.get("supports_function_calling", True))


def load_catalog(path: Path) -> Catalog:
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    models: dict[str, Model] = {}
    for m in raw["models"]:
        caps = m.get("capabilities", {})
        explicit = m.get("prices")
        if explicit:
            inp = float(explicit["input_per_mtok"]) / PER_MTOK
            prices = Prices(
                input=inp,
                output=float(explicit["output_per_mtok"]) / PER_MTOK,
                cache_write=float(explicit.get("cache_write_per_mtok", inp * PER_MTOK)) / PER_MTOK,
                cache_read=float(explicit.get("cache_read_per_mtok", inp * PER_MTOK)) / PER_MTOK,
            )
            window, tools = int(caps.get("context_window", 128_000)), bool(caps.get("tool_use"))
        else:
            found = _litellm_prices(m["name"])
            if found is None:
                raise ValueError(
                    f"{path}: model {m['name']!r} is not in litellm's cost map; give its prices"
                )
            prices, window, tools = found
            window = int(caps.get("context_window", window))
            tools = bool(caps.get("tool_use", tools))
        models[m["name"]] = Model(
            name=m["name"], tier=m["tier"], provider=m["provider"], prices=prices,
            context_window=window, tool_use=tools,
            default_for_tier=bool(m.get("default_for_tier", False)),
            fallback=m.get("fallback"),
        )
    tiers = list(raw["tiers"])
    for model in models.values():
        if model.fallback is not None and model.fallback not in models:
            raise ValueError(f"{path}: model {model.name} falls back to unknown {model.fallback}")
        if model.tier not in tiers:
            raise ValueError(f"{path}: model {model.name} has unknown tier {model.tier!r}")
    task_types = {name: _task_type(name, v) for name, v in (raw.get("task_types") or {}).items()}
    for name, policy in task_types.items():
        if policy.tier not in tiers:
            raise ValueError(f"{path}: task type {name} has unknown tier {policy.tier!r}")
    return Catalog(tiers=tiers, default_tier=raw.get("default_tier", tiers[0]), models=models,
                   task_types=task_types)


@lru_cache(maxsize=4)
def catalog_for(path: Path) -> Catalog:
    return load_catalog(path)
