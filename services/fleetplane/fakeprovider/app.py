"""FastAPI app speaking the Anthropic Messages and OpenAI Chat Completions wire formats.

Hot-path handlers read the raw body and write pre-encoded JSON so a zero-latency call
costs a fraction of a millisecond of server time. Latency and stalls use
``asyncio.sleep`` so concurrent calls overlap.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from .script import ApiKind, CallRecord, InjectedError, Plan, Reply, Script, ScriptRunner, Usage

_SKIP_KEYS = frozenset({"type", "role", "id", "tool_use_id", "tool_call_id", "cache_control"})
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    529: ("server_error", "overloaded"),
}
_USER_ROLES = frozenset({"user", "tool"})
_PAUSE_POLL_S = 0.1
_SSE_HEADERS = {"cache-control": "no-cache"}


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _chars(value: object) -> int:
    """Deterministic size of the text in a JSON-ish value (dict keys and markers skipped)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for k, v in value.items() if k not in _SKIP_KEYS)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if value is None or isinstance(value, bool):
        return 0
    return len(str(value))


def _tokens(chars: int) -> int:
    return max(1, -(-chars // 4))


def _text_of(content: object) -> str:
    """Plain text of a message ``content`` (string, text blocks, or tool results)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict):
            if isinstance(block.get("text"), str):
                parts.append(block["text"])
            elif block.get("type") == "tool_result":
                parts.append(_text_of(block.get("content")))
    return "".join(parts)


@dataclass(slots=True)
class _Request:
    api: ApiKind
    model: str
    stream: bool
    include_usage: bool
    messages: list[Any]
    tool_names: list[str]
    last_user_text: str
    input_chars: int
    cache_prefix: tuple[int, str] | None
    body: dict[str, Any]


def _cache_prefix(segments: list[object], model: str, cache_all: bool) -> tuple[int, str] | None:
    """(chars, key) of the prompt prefix ending at the last ``cache_control`` breakpoint."""
    end = len(segments) if cache_all else 0
    if not cache_all:
        for index, segment in enumerate(segments):
            if isinstance(segment, dict) and segment.get("cache_control"):
                end = index + 1
    if end == 0:
        return None
    prefix = segments[:end]
    digest = hashlib.blake2b(_dumps([model, prefix]), digest_size=16).hexdigest()
    return _chars(prefix), digest


def _segments(content: object) -> list[object]:
    return list(content) if isinstance(content, list) else [content]


def _last_user_text(messages: list[Any]) -> str:
    """Text of the newest user-side message (OpenAI ``tool`` results count as user-side)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") in _USER_ROLES:
            return _text_of(message.get("content"))
    return ""


def _parse_anthropic(body: dict[str, Any]) -> _Request:
    messages = body["messages"]
    tools = body.get("tools") or []
    segments: list[object] = list(tools)
    system = body.get("system")
    if system:
        segments.extend(_segments(system))
    for message in messages:
        if isinstance(message, dict):
            segments.extend(_segments(message.get("content")))
    model = str(body["model"])
    cache_all = bool(body.get("cache_control"))
    return _Request(
        api="anthropic",
        model=model,
        stream=bool(body.get("stream")),
        include_usage=True,
        messages=messages,
        tool_names=[str(t.get("name", "")) for t in tools if isinstance(t, dict)],
        last_user_text=_last_user_text(messages),
        input_chars=_chars(segments),
        cache_prefix=_cache_prefix(segments, model, cache_all),
        body=body,
    )


def _parse_openai(body: dict[str, Any]) -> _Request:
    messages = body["messages"]
    tools = body.get("tools") or []
    segments: list[object] = list(tools)
    for message in messages:
        if not isinstance(message, dict):
            continue
        parts = _segments(message.get("content"))
        if message.get("tool_calls"):
            parts.append(message["tool_calls"])
        if message.get("cache_control") and parts:
            parts[-1] = {"content": parts[-1], "cache_control": message["cache_control"]}
        segments.extend(parts)
    model = str(body["model"])
    names = []
    for tool in tools:
        if isinstance(tool, dict):
            function = tool.get("function")
            names.append(str(function.get("name", "") if isinstance(function, dict) else ""))
    options = body.get("stream_options")
    return _Request(
        api="openai",
        model=model,
        stream=bool(body.get("stream")),
        include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
        messages=messages,
        tool_names=names,
        last_user_text=_last_user_text(messages),
        input_chars=_chars(segments),
        cache_prefix=_cache_prefix(segments, model, False),
        body=body,
    )


@dataclass(slots=True)
class _Answer:
    text: str | None
    tools: list[tuple[str, str, dict[str, Any]]]
    stop_reason: str
    usage: Usage


def _answer(req: _Request, plan: Plan, runner: ScriptRunner) -> _Answer:
    reply: Reply = plan.reply
    text = reply.text
    if text is None and not reply.tool_uses:
        text = "done: " + req.last_user_text[:40]
    prefix = "toolu_fake_" if req.api == "anthropic" else "call_fake_"
    tools = [
        (tool.id or f"{prefix}{plan.seq:06d}_{i}", tool.name, tool.input)
        for i, tool in enumerate(reply.tool_uses)
    ]
    out_chars = len(text or "") + sum(len(name) + len(_dumps(args)) for _, name, args in tools)
    total_in = _tokens(req.input_chars)
    cache_read = cache_write = 0
    if req.cache_prefix is not None:
        prefix_tokens = min(total_in, _tokens(req.cache_prefix[0]))
        if runner.remember_prefix(req.cache_prefix[1]):
            cache_read = prefix_tokens
        else:
            cache_write = prefix_tokens
    usage = Usage(
        input_tokens=total_in - cache_read - cache_write,
        output_tokens=_tokens(out_chars),
        cache_creation_input_tokens=cache_write,
        cache_read_input_tokens=cache_read,
    )
    override = reply.usage
    if override is not None:
        usage = usage.model_copy(update=override.model_dump(exclude_none=True))
    stop_reason = reply.stop_reason or ("tool_use" if tools else "end_turn")
    return _Answer(text=text, tools=tools, stop_reason=stop_reason, usage=usage)


# ---------------------------------------------------------------- Anthropic format


def _anthropic_usage(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
    }


def _anthropic_message(req: _Request, plan: Plan, answer: _Answer) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if answer.text is not None:
        content.append({"type": "text", "text": answer.text})
    for tool_id, name, args in answer.tools:
        content.append({"type": "tool_use", "id": tool_id, "name": name, "input": args})
    return {
        "id": f"msg_fake_{plan.seq:08d}",
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": content,
        "stop_reason": answer.stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(answer.usage),
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def _anthropic_stream(
    req: _Request, plan: Plan, answer: _Answer, runner: ScriptRunner
) -> AsyncIterator[bytes]:
    message = _anthropic_message(req, plan, answer)
    message["content"] = []
    message["stop_reason"] = None
    message["usage"] = dict(message["usage"], output_tokens=1)
    yield _sse("message_start", {"type": "message_start", "message": message})
    yield _sse("ping", {"type": "ping"})
    await _pause(runner, plan.stall_s)
    if plan.error is not None:
        error = plan.error
        yield _sse("error", _anthropic_error(error.status, error.error_type, _message(error)))
        return
    blocks: list[tuple[dict[str, Any], str, str]] = []
    if answer.text is not None:
        blocks.append(({"type": "text", "text": ""}, "text_delta", answer.text))
    for tool_id, name, args in answer.tools:
        start = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
        blocks.append((start, "input_json_delta", _dumps(args).decode()))
    for index, (start, delta_type, payload) in enumerate(blocks):
        yield _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )
        field = "text" if delta_type == "text_delta" else "partial_json"
        for piece in _chunks(payload, plan.chunk_chars):
            delta = {"type": delta_type, field: piece}
            yield _sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": answer.stop_reason, "stop_sequence": None},
            "usage": _anthropic_usage(answer.usage),
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


def _anthropic_error(status: int, error_type: str | None, message: str) -> dict[str, Any]:
    kind = error_type or _ANTHROPIC_ERROR_TYPES.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )
    return {"type": "error", "error": {"type": kind, "message": message}}


# ---------------------------------------------------------------- OpenAI format


def _openai_usage(usage: Usage) -> dict[str, Any]:
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output_tokens,
        "total_tokens": prompt + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cache_read_input_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _openai_tool_calls(answer: _Answer) -> list[dict[str, Any]]:
    return [
        {
            "id": tool_id,
            "type": "function",
            "function": {"name": name, "arguments": _dumps(args).decode()},
        }
        for tool_id, name, args in answer.tools
    ]


def _openai_completion(req: _Request, plan: Plan, answer: _Answer) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
    if answer.tools:
        message["tool_calls"] = _openai_tool_calls(answer)
    return {
        "id": f"chatcmpl-fake-{plan.seq:08d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _FINISH_REASONS.get(answer.stop_reason, answer.stop_reason),
            }
        ],
        "usage": _openai_usage(answer.usage),
    }


async def _openai_stream(
    req: _Request, plan: Plan, answer: _Answer, runner: ScriptRunner
) -> AsyncIterator[bytes]:
    base: dict[str, Any] = {
        "id": f"chatcmpl-fake-{plan.seq:08d}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": "fp_fake",
    }
    if req.include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + _dumps(dict(base, choices=[choice])) + b"\n\n"

    yield chunk({"role": "assistant", "content": ""})
    await _pause(runner, plan.stall_s)
    if plan.error is not None:
        error = _openai_error(plan.error.status, plan.error.error_type, _message(plan.error))
        yield b"data: " + _dumps(error) + b"\n\n"
        return
    for piece in _chunks(answer.text or "", plan.chunk_chars):
        yield chunk({"content": piece})
    for index, call in enumerate(_openai_tool_calls(answer)):
        function = call["function"]
        head = dict(call, index=index, function={"name": function["name"], "arguments": ""})
        yield chunk({"tool_calls": [head]})
        for piece in _chunks(function["arguments"], plan.chunk_chars):
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    yield chunk({}, _FINISH_REASONS.get(answer.stop_reason, answer.stop_reason))
    if req.include_usage:
        final = dict(base, choices=[], usage=_openai_usage(answer.usage))
        yield b"data: " + _dumps(final) + b"\n\n"
    yield b"data: [DONE]\n\n"


def _openai_error(status: int, error_type: str | None, message: str) -> dict[str, Any]:
    default = ("server_error" if status >= 500 else "invalid_request_error", None)
    kind, code = _OPENAI_ERRORS.get(status, default)
    return {"error": {"message": message, "type": error_type or kind, "param": None, "code": code}}


# ---------------------------------------------------------------- request handling


def _error_body(api: ApiKind, status: int, error_type: str | None, message: str) -> dict[str, Any]:
    return (_anthropic_error if api == "anthropic" else _openai_error)(status, error_type, message)


def _error_response(body: dict[str, Any], status: int, retry_after: float | None) -> Response:
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
        headers["retry-after-ms"] = str(int(retry_after * 1000))
    return Response(
        _dumps(body), status_code=status, headers=headers, media_type="application/json"
    )


def _bad_request(api: ApiKind, exc: Exception) -> Response:
    return _error_response(_error_body(api, 400, None, f"invalid request: {exc}"), 400, None)


def _retry_after(error: InjectedError) -> float | None:
    if error.retry_after_s is None and error.status == 429:
        return 1.0
    return error.retry_after_s


def _message(error: InjectedError) -> str:
    return error.message or f"fake provider injected HTTP {error.status}"


def _record(
    runner: ScriptRunner,
    req: _Request,
    plan: Plan,
    status: int,
    *,
    error_type: str | None = None,
    answer: _Answer | None = None,
    traceparent: str | None = None,
) -> None:
    runner.record(
        CallRecord(
            seq=plan.seq,
            received_at=time.time(),
            api=req.api,
            model=req.model,
            stream=req.stream,
            message_count=len(req.messages),
            tool_names=req.tool_names,
            last_user_text=req.last_user_text[:200],
            status=status,
            error_type=error_type,
            stop_reason=answer.stop_reason if answer else None,
            usage=answer.usage if answer else None,
            delay_ms=(plan.latency_s + plan.stall_s) * 1000.0,
            request=req.body if plan.record_bodies else None,
            traceparent=traceparent,
        )
    )


async def _complete(request: Request, api: ApiKind) -> Response:
    runner: ScriptRunner = request.app.state.runner
    try:
        body = json.loads(await request.body())
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise ValueError("'messages' must be a list")
        if not body.get("model"):
            raise ValueError("'model' is required")
        req = (_parse_anthropic if api == "anthropic" else _parse_openai)(body)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return _bad_request(api, exc)
    plan = runner.plan(req.model, req.last_user_text)
    error = plan.error
    if error is not None:
        error_body = _error_body(api, error.status, error.error_type, _message(error))
        error_type = str(error_body["error"]["type"])
        if not (req.stream and error.mid_stream):
            _record(runner, req, plan, error.status, error_type=error_type,
                    traceparent=request.headers.get("traceparent"))
            await _pause(runner, plan.latency_s + plan.stall_s)
            return _error_response(error_body, error.status, _retry_after(error))
        # Mid-stream failure: HTTP 200 and the stream head, then an error event.
        _record(runner, req, plan, 200, error_type=error_type,
                traceparent=request.headers.get("traceparent"))
    answer = _answer(req, plan, runner)
    if error is None:
        _record(runner, req, plan, 200, answer=answer,
                traceparent=request.headers.get("traceparent"))
    headers = {"request-id" if api == "anthropic" else "x-request-id": f"req_fake_{plan.seq:08d}"}
    if req.stream:
        await _pause(runner, plan.latency_s)
        stream = _anthropic_stream if api == "anthropic" else _openai_stream
        return StreamingResponse(
            stream(req, plan, answer, runner),
            media_type="text/event-stream",
            headers=_SSE_HEADERS | headers,
        )
    await _pause(runner, plan.latency_s + plan.stall_s)
    build = _anthropic_message if api == "anthropic" else _openai_completion
    return Response(
        _dumps(build(req, plan, answer)), headers=headers, media_type="application/json"
    )


async def _pause(runner: ScriptRunner, seconds: float) -> None:
    """Sleep without blocking the loop; cut short once the server starts shutting down."""
    if seconds <= 0:
        return
    deadline = time.monotonic() + seconds
    while not runner.closing:
        await asyncio.sleep(min(seconds, _PAUSE_POLL_S))
        seconds = deadline - time.monotonic()
        if seconds <= 0:
            return


async def anthropic_messages(request: Request) -> Response:
    return await _complete(request, "anthropic")


async def openai_chat_completions(request: Request) -> Response:
    return await _complete(request, "openai")


async def anthropic_count_tokens(request: Request) -> Response:
    try:
        body = json.loads(await request.body())
        req = _parse_anthropic(body)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return _bad_request("anthropic", exc)
    return Response(
        _dumps({"input_tokens": _tokens(req.input_chars)}), media_type="application/json"
    )


def create_app(script: Script | None = None, *, runner: ScriptRunner | None = None) -> FastAPI:
    """Build the fake provider app. Pass ``runner`` to share state with the caller."""
    state = runner if runner is not None else ScriptRunner(script)
    app = FastAPI(title="fleetplane fake model provider", docs_url=None, redoc_url=None)
    app.state.runner = state
    app.add_route("/v1/messages", anthropic_messages, methods=["POST"])
    app.add_route("/v1/messages/count_tokens", anthropic_count_tokens, methods=["POST"])
    app.add_route("/v1/chat/completions", openai_chat_completions, methods=["POST"])
    app.add_route("/chat/completions", openai_chat_completions, methods=["POST"])

    @app.get("/_fake/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/_fake/script")
    async def get_script() -> Script:
        return state.script

    @app.post("/_fake/script")
    async def set_script(new_script: Script) -> Script:
        state.set_script(new_script)
        return new_script

    @app.get("/_fake/calls")
    async def get_calls(since: int = 0) -> list[CallRecord]:
        return [call for call in state.calls() if call.seq > since]

    @app.post("/_fake/reset")
    async def reset() -> dict[str, str]:
        state.reset()
        return {"status": "reset"}

    return app
