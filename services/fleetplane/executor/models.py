"""Model calls through the providers' SDKs; the usage they report is what gets priced.

Anthropic models go through the anthropic SDK, OpenAI models through the openai SDK, every other
provider through litellm (`openai_via_litellm` sends OpenAI's there too).

The SDKs' own retries are off (max_retries=0 / num_retries=0): the agent loop retries retriable
errors itself so that every call, failed or not, is audited (docs/executor.md)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anthropic
import httpx2
import openai
import orjson

from fleetplane.core.catalog import Model, Usage
from fleetplane.core.settings import Settings
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
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        value = headers.get("retry-after")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


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


#: model calls in flight per HTTP client of the asyncio path (ModelClients.async_anthropic)
CALLS_PER_CLIENT = 50


class ModelClients:
    """One SDK client per provider, shared by the executor's slots (they are thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # the agent loop's calls (achat) run on the process's asyncio loop (AsyncCalls): clients
        # created on that loop at the first call (an httpx.AsyncClient is bound to it)
        self._async_clients: list[anthropic.AsyncAnthropic] = []
        self._next_client = 0
        self._async_openai: list[openai.AsyncOpenAI] = []
        self._next_openai = 0

    @property
    def async_anthropic(self) -> anthropic.AsyncAnthropic:
        """One of ``ceil(slots / CALLS_PER_CLIENT)`` clients, round-robin (on the calls' loop).

        Why several: httpcore's pool re-examines every connection it holds each time a request
        enters or leaves it (`_assign_requests_to_connections`), so one pool under N calls in
        flight costs O(N) per call, O(N^2) to start N: with 2,000 calls this was most of the
        model-calls thread's time, and the provider saw 51 requests of 1,331 started attempts
        (docs/executor.md, "What limits one process"). Each pool holds at most about
        CALLS_PER_CLIENT connections (no pool limit: the SDK's default of 1,000 would queue the
        1,001st call behind a connection, not a model)."""
        if not self._async_clients:
            n = max(1, -(-self.settings.executor_slots // CALLS_PER_CLIENT))
            self._async_clients = [self._anthropic_client(self.settings.model_timeout_s,
                                                          self._http_client(anthropic))
                                   for _ in range(n)]
        self._next_client = (self._next_client + 1) % len(self._async_clients)
        return self._async_clients[self._next_client]

    @property
    def async_openai(self) -> openai.AsyncOpenAI:
        """As `async_anthropic`, for `provider: openai` models (the openai SDK's pools are
        httpx pools too)."""
        if not self._async_openai:
            n = max(1, -(-self.settings.executor_slots // CALLS_PER_CLIENT))
            self._async_openai = [self._openai_client(self.settings.model_timeout_s,
                                                      self._http_client(openai))
                                  for _ in range(n)]
        self._next_openai = (self._next_openai + 1) % len(self._async_openai)
        return self._async_openai[self._next_openai]

    async def aclose(self) -> None:
        """Close the shared clients and their connections (on the calls' loop, which made
        them): at shutdown, so no session is left for the interpreter to warn about."""
        shared: list[anthropic.AsyncAnthropic | openai.AsyncOpenAI] = [
            *self._async_clients, *self._async_openai]
        self._async_clients, self._async_openai = [], []
        for client in shared:
            await client.close()

    def _http_client(self, sdk: Any) -> httpx2.AsyncClient:
        """The HTTP client under one shared SDK client (`sdk`: the anthropic or openai module,
        whose DefaultAioHttpClient / DefaultAsyncHttpxClient carry the SDK's defaults).

        aiohttp (`model_http_transport`, the default) cost 0.76-0.92 ms of CPU per call against
        1.68-1.78 through httpx (1,000 calls, 500 in flight, both SDKs; docs/executor.md). No
        connection limit in either: a call must wait for its model, never for a connection
        (aiohttp's 0 is unlimited; httpx's None)."""
        if self.settings.model_http_transport == "aiohttp":
            client: httpx2.AsyncClient = sdk.DefaultAioHttpClient(limits=httpx2.Limits(
                max_connections=0, max_keepalive_connections=CALLS_PER_CLIENT))
            return client
        client = sdk.DefaultAsyncHttpxClient(limits=httpx2.Limits(
            max_connections=None, max_keepalive_connections=CALLS_PER_CLIENT))
        return client

    def _anthropic_client(self, timeout_s: float, http_client: httpx2.AsyncClient | None = None
                          ) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.settings.anthropic_base_url,
                                        api_key=self.settings.anthropic_api_key, max_retries=0,
                                        timeout=timeout_s, http_client=http_client)

    def _openai_client(self, timeout_s: float,
                       http_client: httpx2.AsyncClient | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.settings.openai_base_url,
                                  api_key=self.settings.openai_api_key, max_retries=0,
                                  timeout=timeout_s, http_client=http_client)

    # -- the tool-use loop's call ------------------------------------------------------------
    def chat(self, model: Model, system: str | None, messages: list[dict[str, Any]],
             tools: list[str], max_tokens: int, temperature: float,
             timeout_s: float) -> ModelTurn:
        """One turn, blocking (a loop of its own for this call; the executor's attempts use
        achat on the shared loop, AsyncCalls)."""
        return asyncio.run(self.achat(model, system, messages, tools, max_tokens, temperature,
                                      timeout_s, shared=False))

    async def achat(self, model: Model, system: str | None, messages: list[dict[str, Any]],
                    tools: list[str], max_tokens: int, temperature: float,
                    timeout_s: float, shared: bool = True) -> ModelTurn:
        """One turn: `messages` in Anthropic form (text, tool_use and tool_result blocks);
        litellm models get them converted to the OpenAI form. Awaits the provider without a
        thread: thousands of calls in flight cost a socket and a coroutine each."""
        start = time.perf_counter()
        try:
            if model.provider == "anthropic":
                return await self._anthropic_chat(model, system, messages, tools, max_tokens,
                                                  timeout_s, start, shared)
            if model.provider == "openai" and not self.settings.openai_via_litellm:
                return await self._openai_chat(model, system, messages, tools, max_tokens,
                                               temperature, timeout_s, start, shared)
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
                              timeout_s: float, start: float, shared: bool) -> ModelTurn:
        from fleetplane.executor.tools import anthropic_tools

        kwargs: dict[str, Any] = {}
        if system:
            kwargs["system"] = system
        if tools:
            kwargs["tools"] = anthropic_tools(tools)
        if headers := trace_headers():  # the attempt's trace context to the provider
            kwargs["extra_headers"] = headers
        client = self.async_anthropic if shared else self._anthropic_client(timeout_s)
        try:
            # the raw response: the SDK builds and sends the request, authenticates and raises
            # its own status errors, but builds no pydantic Message (stop 22: the answer's few
            # fields are read from its JSON)
            raw = await client.messages.with_raw_response.create(
                model=model.name, max_tokens=max_tokens,
                messages=messages,  # type: ignore[arg-type]
                timeout=timeout_s, **kwargs)
            msg: dict[str, Any] = orjson.loads(await raw.read())
        finally:
            if not shared:
                await client.close()
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
                           temperature: float, timeout_s: float, start: float,
                           shared: bool) -> ModelTurn:
        """An OpenAI model through the openai SDK: the request and the response litellm would
        send and read, without its per-call cost map lookups and logging payloads."""
        from fleetplane.executor.tools import openai_tools

        # the request body as JSON-ready data, posted with the SDK's `post` (its documented
        # way to send a request it has no typed method for; auth, retries, timeouts and its
        # status errors as for `create`). `create` walks the body through its TypedDict
        # transform, an identity for this plain JSON that hashes the model parameter's
        # Literal of every model name on each call: 0.86-0.98 ms of CPU per call with
        # `create` and the conversation as `extra_body` (stop 22), 0.72 with `post`
        # (stop 32, docs/executor.md)
        body: dict[str, Any] = {"model": model.name, "messages": to_openai(system, messages),
                                "max_tokens": max_tokens, "temperature": temperature}
        if tools:
            body["tools"] = openai_tools(tools)
        client = self.async_openai if shared else self._openai_client(timeout_s)
        try:
            raw = await client.post("/chat/completions", cast_to=httpx2.Response, body=body,
                                    options={"timeout": timeout_s, "headers": trace_headers()})
            resp: dict[str, Any] = orjson.loads(raw.content)  # (read: not streamed)
        finally:
            if not shared:
                await client.close()
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
