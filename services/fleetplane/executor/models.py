"""Model calls; the usage the provider reports is what gets priced.

Anthropic and OpenAI models go straight over HTTP (`provider_http`: the requests their SDKs
send, without the SDKs' per-call models), every other provider through litellm
(`openai_via_litellm` sends OpenAI's there too).

Nothing retries inside a call (litellm's num_retries=0): the agent loop retries retriable
errors itself so that every call, failed or not, is audited (docs/executor.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from fleetplane.core.catalog import Model, Usage
from fleetplane.core.settings import Settings
from fleetplane.executor.provider_http import ProviderHTTP, ProviderStatusError
from fleetplane.tracing import trace_headers

T = TypeVar("T")


@dataclass(frozen=True)
class ToolUseRequest:
    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class ModelTurn:
    """One assistant turn of the tool-use loop."""

    text: str
    tool_uses: list[ToolUseRequest]
    usage: Usage
    stop_reason: str | None
    latency_ms: float
    model: str = ""
    blocks: list[dict[str, Any]] = field(default_factory=list)


class ModelCallError(Exception):
    """A provider call failed; `kind` classifies it (rate_limited, overloaded, timeout, ...)."""

    def __init__(self, kind: str, message: str, retriable: bool, latency_ms: float,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retriable = retriable
        self.latency_ms = latency_ms
        self.retry_after_s = retry_after_s


def retry_after(exc: Exception) -> float | None:
    headers = getattr(exc, "headers", None)  # ProviderStatusError
    if headers is None:
        headers = getattr(getattr(exc, "response", None), "headers", None)  # an SDK's error
    if headers is None:
        return None
    try:
        value = headers.get("retry-after")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _status_class(status: int, text: str, other: str) -> tuple[str, bool]:
    if status == 429:
        return "rate_limited", True
    if status == 529:
        return "overloaded", True
    if status >= 500:
        return "server_error", True
    if "context" in text and ("long" in text or "exceed" in text):
        return "context_too_long", False
    if status == 400:
        return "bad_request", False
    return other, False


def classify(exc: Exception) -> tuple[str, bool]:
    if isinstance(exc, TimeoutError):  # asyncio's, and aiohttp's connect and read timeouts
        return "timeout", True
    if isinstance(exc, ProviderStatusError):  # other 4xx: as the anthropic SDK's / openai's
        return _status_class(exc.status_code, str(exc).lower(),
                             "bad_request" if exc.api == "anthropic" else "model_error")
    if isinstance(exc, aiohttp.ClientError):  # refused, reset, disconnected, a cut answer
        return "network", True
    name = type(exc).__name__
    text = str(exc).lower()
    status = getattr(exc, "status_code", None)
    if "Timeout" in name:
        return "timeout", True
    if "RateLimit" in name or status == 429:
        return "rate_limited", True
    if "ContextWindow" in name or ("context" in text and ("long" in text or "exceed" in text)):
        return "context_too_long", False
    if status == 529 or "overloaded" in text:
        return "overloaded", True
    if "APIConnection" in name or "ConnectError" in name or "Connection" in name:
        return "network", True
    if (isinstance(status, int) and status >= 500) or "InternalServer" in name \
            or "ServiceUnavailable" in name:
        return "server_error", True
    if "BadRequest" in name or status == 400:
        return "bad_request", False
    return "model_error", False


def import_litellm() -> Any:
    """The litellm module (imported once; later calls return it at once)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm


class ModelClients:
    """The model calls of the executor's slots: Anthropic and OpenAI models straight over HTTP
    (`provider_http.ProviderHTTP`, one session on the model-calls loop), every other provider
    through litellm."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = ProviderHTTP(settings.anthropic_base_url, settings.anthropic_api_key,
                                 settings.openai_base_url, settings.openai_api_key)

    def close(self, calls: AsyncCalls) -> None:
        """Close the HTTP session on the calls' loop (its connections), if that loop runs."""
        if calls.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.http.close(), calls.loop).result(2)

    async def achat(self, model: Model, system: str | None, messages: list[dict[str, Any]],
                    tools: list[str], max_tokens: int, temperature: float,
                    timeout_s: float) -> ModelTurn:
        """One turn: `messages` in Anthropic form (text, tool_use and tool_result blocks);
        OpenAI and litellm models get them converted to the OpenAI form. Awaits the provider
        without a thread: thousands of calls in flight cost a socket and a coroutine each."""
        start = time.perf_counter()
        try:
            if model.provider == "anthropic":
                return await self._anthropic_chat(model, system, messages, tools, max_tokens,
                                                  timeout_s, start)
            if model.provider == "openai" and not self.settings.openai_via_litellm:
                return await self._openai_chat(model, system, messages, tools, max_tokens,
                                               temperature, timeout_s, start)
            return await self._litellm_chat(model, system, messages, tools, max_tokens,
                                            temperature, timeout_s, start)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            kind, retriable = classify(exc)
            raise ModelCallError(kind, str(exc)[:500], retriable,
                                 (time.perf_counter() - start) * 1000, retry_after(exc)) from exc

    async def _anthropic_chat(self, model: Model, system: str | None,
                              messages: list[dict[str, Any]], tools: list[str], max_tokens: int,
                              timeout_s: float, start: float) -> ModelTurn:
        from fleetplane.executor.tools import anthropic_tools

        body: dict[str, Any] = {"model": model.name, "max_tokens": max_tokens,
                                "messages": messages}
        if system:
            body["system"] = system
        if tools:
            body["tools"] = anthropic_tools(tools)
        msg = await self.http.anthropic_messages(body, timeout_s, trace_headers())
        blocks: list[dict[str, Any]] = []
        uses: list[ToolUseRequest] = []
        texts: list[str] = []
        for b in msg.get("content") or ():
            if b.get("type") == "text":
                texts.append(b["text"])
                blocks.append({"type": "text", "text": b["text"]})
            elif b.get("type") == "tool_use":
                args = b.get("input")
                args = dict(args) if isinstance(args, dict) else {}
                uses.append(ToolUseRequest(b["id"], b["name"], args))
                blocks.append({"type": "tool_use", "id": b["id"], "name": b["name"],
                               "input": args})
        u = msg.get("usage") or {}
        usage = Usage(input_tokens=int(u.get("input_tokens") or 0),
                      output_tokens=int(u.get("output_tokens") or 0),
                      cache_creation_input_tokens=int(u.get("cache_creation_input_tokens") or 0),
                      cache_read_input_tokens=int(u.get("cache_read_input_tokens") or 0))
        return ModelTurn("".join(texts), uses, usage, msg.get("stop_reason"),
                         (time.perf_counter() - start) * 1000, model.name, blocks)

    async def _litellm_chat(self, model: Model, system: str | None,
                            messages: list[dict[str, Any]], tools: list[str], max_tokens: int,
                            temperature: float, timeout_s: float, start: float) -> ModelTurn:
        # importing litellm takes seconds (minutes on a loaded machine): at the first litellm
        # call, and never on the loop that holds every attempt's calls and cancellations (a
        # background import at start-up was measured taking a quarter of the executor's CPU
        # samples while 2,000 attempts started: lazy it is)
        litellm = await asyncio.to_thread(import_litellm)

        from fleetplane.executor.tools import openai_tools

        kwargs: dict[str, Any] = {}
        if tools:
            kwargs["tools"] = openai_tools(tools)
        if headers := trace_headers():  # the attempt's trace context to the provider
            kwargs["extra_headers"] = headers
        resp: Any = await litellm.acompletion(
            model=f"{model.provider}/{model.name}", messages=to_openai(system, messages),
            max_tokens=max_tokens, temperature=temperature, api_base=self.settings.openai_base_url,
            api_key=self.settings.openai_api_key, num_retries=0, max_retries=0,
            timeout=timeout_s, **kwargs)
        return _openai_turn(resp.model_dump(), model, start)

    async def _openai_chat(self, model: Model, system: str | None,
                           messages: list[dict[str, Any]], tools: list[str], max_tokens: int,
                           temperature: float, timeout_s: float, start: float) -> ModelTurn:
        """An OpenAI model: the request and the response litellm would send and read, without
        its per-call cost map lookups and logging payloads."""
        from fleetplane.executor.tools import openai_tools

        body: dict[str, Any] = {"model": model.name, "messages": to_openai(system, messages),
                                "max_tokens": max_tokens, "temperature": temperature}
        if tools:
            body["tools"] = openai_tools(tools)
        resp = await self.http.openai_chat(body, timeout_s, trace_headers())
        return _openai_turn(resp, model, start)


def _openai_turn(resp: dict[str, Any], model: Model, start: float) -> ModelTurn:
    """A chat completion (the provider's JSON, or litellm's response dumped) as one turn."""
    usage_raw = resp.get("usage") or {}
    cached = int((usage_raw.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    usage = Usage(input_tokens=int(usage_raw.get("prompt_tokens") or 0) - cached,
                  output_tokens=int(usage_raw.get("completion_tokens") or 0),
                  cache_read_input_tokens=cached)
    choice = resp["choices"][0]
    message = choice["message"]
    text = message.get("content") or ""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    uses: list[ToolUseRequest] = []
    for tc in message.get("tool_calls") or ():
        function = tc["function"]
        try:
            args = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError:
            args = {"_unparsed": function.get("arguments")}
        if not isinstance(args, dict):
            args = {"_value": args}
        uses.append(ToolUseRequest(tc["id"], function["name"], args))
        blocks.append({"type": "tool_use", "id": tc["id"], "name": function["name"],
                       "input": args})
    return ModelTurn(text, uses, usage, choice.get("finish_reason"),
                     (time.perf_counter() - start) * 1000, model.name, blocks)


class AsyncCalls:
    """The process's asyncio loop for model calls (a thread of its own). `submit(coro)` returns
    a concurrent Future the attempt's slot thread waits on (Running.wait); cancelling it cancels
    the call's task, which closes its HTTP request."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="model-calls", daemon=True)
        self._thread.start()
        self.in_flight = 0
        self.peak_in_flight = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _fut: Future[Any]) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


def to_openai(system: str | None, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic-form messages as OpenAI chat messages (tool_use -> tool_calls, tool_result ->
    role "tool")."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if m["role"] == "assistant":
            text = "".join(b.get("text", "") for b in content if b.get("type") == "text")
            calls = [{"id": b["id"], "type": "function",
                      "function": {"name": b["name"], "arguments": json.dumps(b["input"])}}
                     for b in content if b.get("type") == "tool_use"]
            msg: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        texts = []
        for b in content:
            if b.get("type") == "tool_result":
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                            "content": str(b.get("content", ""))})
            elif b.get("type") == "text":
                texts.append(b["text"])
        if texts:
            out.append({"role": "user", "content": "".join(texts)})
    return out
