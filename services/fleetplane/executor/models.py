"""Model calls through the providers' SDKs; the usage they report is what gets priced."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import anthropic

from fleetplane.core.catalog import Model, Usage
from fleetplane.core.settings import Settings


@dataclass(frozen=True)
class ModelResult:
    text: str
    usage: Usage
    stop_reason: str | None
    latency_ms: float


class ModelCallError(Exception):
    """A provider call failed; `kind` classifies it (rate_limited, overloaded, timeout, ...)."""

    def __init__(self, kind: str, message: str, retriable: bool, latency_ms: float) -> None:
        super().__init__(message)
        self.kind = kind
        self.retriable = retriable
        self.latency_ms = latency_ms


def classify(exc: Exception) -> tuple[str, bool]:
    if isinstance(exc, anthropic.APITimeoutError):
        return "timeout", True
    if isinstance(exc, anthropic.APIConnectionError):
        return "network", True
    if isinstance(exc, anthropic.RateLimitError):
        return "rate_limited", True
    if isinstance(exc, anthropic.APIStatusError):
        if exc.status_code == 529:
            return "overloaded", True
        if exc.status_code >= 500:
            return "server_error", True
        if "context" in str(exc).lower() and "long" in str(exc).lower():
            return "context_too_long", False
        return "bad_request", False
    name = type(exc).__name__
    if "Timeout" in name:
        return "timeout", True
    if "RateLimit" in name:
        return "rate_limited", True
    return "model_error", False


class ModelClients:
    """One SDK client per provider, shared by the executor's slots (they are thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.anthropic = anthropic.Anthropic(
            base_url=settings.anthropic_base_url,
            api_key=settings.anthropic_api_key,
            max_retries=settings.model_max_retries,
            timeout=settings.model_timeout_s,
        )

    def call(self, model: Model, prompt: str, system: str | None, max_tokens: int,
             temperature: float) -> ModelResult:
        start = time.perf_counter()
        try:
            if model.provider == "anthropic":
                return self._anthropic(model, prompt, system, max_tokens, temperature, start)
            return self._litellm(model, prompt, system, max_tokens, temperature, start)
        except Exception as exc:
            kind, retriable = classify(exc)
            raise ModelCallError(kind, str(exc)[:500], retriable,
                                 (time.perf_counter() - start) * 1000) from exc

    def _anthropic(self, model: Model, prompt: str, system: str | None, max_tokens: int,
                   temperature: float, start: float) -> ModelResult:
        kwargs: dict[str, Any] = {}
        if system:
            kwargs["system"] = system
        # The anthropic SDK (2.x) no longer takes sampling temperature: current Claude models
        # choose their own; `temperature` still keys the response cache (docs/routing.md).
        msg = self.anthropic.messages.create(
            model=model.name, max_tokens=max_tokens,
            messages=[{"role": "user", "content": prompt}], **kwargs,
        )
        text = "".join(getattr(b, "text", "") for b in msg.content)
        u = msg.usage
        usage = Usage(
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_creation_input_tokens=u.cache_creation_input_tokens or 0,
            cache_read_input_tokens=u.cache_read_input_tokens or 0,
        )
        return ModelResult(text, usage, msg.stop_reason, (time.perf_counter() - start) * 1000)

    def _litellm(self, model: Model, prompt: str, system: str | None, max_tokens: int,
                 temperature: float, start: float) -> ModelResult:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        resp: Any = litellm.completion(
            model=f"{model.provider}/{model.name}", messages=messages, max_tokens=max_tokens,
            temperature=temperature, api_base=self.settings.openai_base_url,
            api_key=self.settings.openai_api_key, num_retries=self.settings.model_max_retries,
            timeout=self.settings.model_timeout_s,
        )
        usage_raw = resp.usage
        details = getattr(usage_raw, "prompt_tokens_details", None)
        cached = int(getattr(details, "cached_tokens", 0) or 0)
        usage = Usage(
            input_tokens=int(usage_raw.prompt_tokens) - cached,
            output_tokens=int(usage_raw.completion_tokens),
            cache_read_input_tokens=cached,
        )
        choice = resp.choices[0]
        return ModelResult(choice.message.content or "", usage, choice.finish_reason,
                           (time.perf_counter() - start) * 1000)
