"""The executor's model calls straight over HTTP (executor/provider_http.py): what a provider
receives (auth, API version, the body) and how its answers and errors become a turn or an error
class, against a real HTTP server on loopback that answers as the Anthropic and OpenAI APIs do."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from fleetplane.core.catalog import catalog_for
from fleetplane.core.settings import Settings
from fleetplane.executor.models import ModelCallError, ModelClients, ModelTurn

CATALOG = catalog_for(Settings().catalog_file)
CLAUDE = CATALOG.model("claude-haiku-4-5")
GPT = CATALOG.model("gpt-4o-mini")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/v1/messages", handler)
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


def _call(handler: Handler, model: Any, tools: list[str] | None = None,
          timeout_s: float = 5.0, port: int | None = None) -> ModelTurn:
    """One achat against `handler` (served on loopback for the call), as the executor makes it."""

    async def go() -> ModelTurn:
        runner, served = await _serve(handler)
        p = port or served
        clients = ModelClients(Settings(anthropic_base_url=f"http://127.0.0.1:{p}",
                                        anthropic_api_key="sk-ant-test",
                                        openai_base_url=f"http://127.0.0.1:{p}/v1",
                                        openai_api_key="sk-oa-test"))
        try:
            return await clients.achat(model, "be brief",
                                       [{"role": "user", "content": "hello"}], tools or [],
                                       128, 0.2, timeout_s)
        finally:
            await clients.http.close()
            await runner.cleanup()

    return asyncio.run(go())


def test_an_anthropic_call_sends_the_messages_api_request_and_reads_the_answer() -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["headers"], seen["body"] = dict(request.headers), await request.json()
        return web.json_response({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": "reading"},
                        {"type": "tool_use", "id": "tu_1", "name": "read_file",
                         "input": {"path": "a.py"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 11, "output_tokens": 7,
                      "cache_creation_input_tokens": 3, "cache_read_input_tokens": None}})

    turn = _call(handler, CLAUDE, tools=["read_file"])
    assert seen["headers"]["x-api-key"] == "sk-ant-test"
    assert seen["headers"]["anthropic-version"] == "2023-06-01"
    body = seen["body"]
    assert body["model"] == "claude-haiku-4-5" and body["max_tokens"] == 128
    assert body["system"] == "be brief" and body["messages"] == [
        {"role": "user", "content": "hello"}]
    assert [t["name"] for t in body["tools"]] == ["read_file"]
    assert "temperature" not in body  # as before: the anthropic SDK 2.x took none
    assert turn.text == "reading" and turn.stop_reason == "tool_use"
    assert [(u.id, u.name, u.input) for u in turn.tool_uses] == [
        ("tu_1", "read_file", {"path": "a.py"})]
    assert (turn.usage.input_tokens, turn.usage.output_tokens,
            turn.usage.cache_creation_input_tokens, turn.usage.cache_read_input_tokens) == (
        11, 7, 3, 0)
    assert turn.blocks[1] == {"type": "tool_use", "id": "tu_1", "name": "read_file",
                              "input": {"path": "a.py"}}


def test_an_openai_call_sends_chat_completions_and_reads_tool_calls_and_cached_tokens() -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["headers"], seen["body"] = dict(request.headers), await request.json()
        return web.json_response({
            "id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "read_file", "arguments": json.dumps({"path": "b.py"})}}]}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25,
                      "prompt_tokens_details": {"cached_tokens": 8}}})

    turn = _call(handler, GPT, tools=["read_file"])
    assert seen["headers"]["Authorization"] == "Bearer sk-oa-test"
    body = seen["body"]
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hello"}]
    assert body["max_tokens"] == 128 and body["temperature"] == 0.2
    assert body["tools"][0]["function"]["name"] == "read_file"
    assert turn.text == "" and turn.stop_reason == "tool_calls"
    assert [(u.id, u.name, u.input) for u in turn.tool_uses] == [
        ("call_1", "read_file", {"path": "b.py"})]
    assert (turn.usage.input_tokens, turn.usage.cache_read_input_tokens,
            turn.usage.output_tokens) == (12, 8, 5)


def _error(status: int, text: str, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"type": "error", "error": {"type": "x", "message": text}},
                                 status=status, headers=headers)
    return handler


@pytest.mark.parametrize(("model", "status", "text", "kind", "retriable"), [
    (CLAUDE, 429, "slow down", "rate_limited", True),
    (CLAUDE, 529, "Overloaded", "overloaded", True),
    (GPT, 503, "unavailable", "server_error", True),
    (CLAUDE, 400, "prompt is too long: context window exceeded", "context_too_long", False),
    (GPT, 400, "context_length_exceeded", "context_too_long", False),
    (GPT, 400, "bad field", "bad_request", False),
    (CLAUDE, 401, "invalid x-api-key", "bad_request", False),  # the anthropic SDK's class
    (GPT, 401, "invalid api key", "model_error", False),  # the openai SDK's
], ids=lambda v: getattr(v, "name", v))
def test_provider_errors_keep_their_class(model: Any, status: int, text: str, kind: str,
                                          retriable: bool) -> None:
    with pytest.raises(ModelCallError) as err:
        _call(_error(status, text), model)
    assert (err.value.kind, err.value.retriable) == (kind, retriable)
    assert text in str(err.value)


def test_retry_after_is_read_from_the_answer() -> None:
    with pytest.raises(ModelCallError) as err:
        _call(_error(429, "slow down", {"Retry-After": "3"}), CLAUDE)
    assert err.value.retry_after_s == 3.0


def test_a_slow_answer_times_out_and_a_refused_connection_is_a_network_error() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({})

    with pytest.raises(ModelCallError) as err:
        _call(slow, GPT, timeout_s=0.2)
    assert (err.value.kind, err.value.retriable) == ("timeout", True)

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(ModelCallError) as err:
        _call(_error(500, "unused"), CLAUDE, port=closed)
    assert (err.value.kind, err.value.retriable) == ("network", True)


def test_the_executor_does_not_load_the_provider_sdks() -> None:
    """The SDKs' per-call request and response models were half the executor's Python CPU in a
    burst (docs/executor.md, stop 22): the executor's modules load neither SDK (litellm, for
    other providers, is imported at its first call)."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, fleetplane.executor.main; print(sorted(m for m in "
         "('anthropic', 'openai', 'litellm', 'httpx2') if m in sys.modules))"],
        capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
