"""The fake model provider driven over HTTP by the real anthropic / openai SDKs and litellm."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from fleetplane.fakeprovider import FakeProvider, Script, parse_config

CLAUDE = "claude-sonnet-4-5"
GPT = "gpt-4o-mini"
SERVICES = Path(__file__).resolve().parents[2] / "services"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


@pytest.fixture(autouse=True)
def _clean(fake: FakeProvider) -> None:
    fake.set_script(None)
    fake.reset()


@pytest.fixture
def claude(fake: FakeProvider) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.base_url, api_key="test", max_retries=0)


@pytest.fixture
def gpt(fake: FakeProvider) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.openai_base_url, api_key="test", max_retries=0)


def tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
OPENAI_WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


# ---------------------------------------------------------------- Anthropic SDK


def test_anthropic_text_reply_usage_and_prompt_cache(
    claude: anthropic.Anthropic, fake: FakeProvider
) -> None:
    system: Any = [{"type": "text", "text": "S" * 400, "cache_control": {"type": "ephemeral"}}]
    question = "What is up?"

    first = claude.messages.create(
        model=CLAUDE, max_tokens=64, system=system, messages=user(question)
    )
    second = claude.messages.create(
        model=CLAUDE, max_tokens=64, system=system, messages=user(question)
    )

    assert first.content[0].type == "text"
    assert first.content[0].text == "done: What is up?"
    assert first.stop_reason == "end_turn"
    assert first.model == CLAUDE
    assert first.usage.output_tokens == tokens("done: What is up?")
    assert first.usage.cache_creation_input_tokens == 100  # 400 cached chars / 4
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.input_tokens == tokens("S" * 400 + question) - 100
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.cache_read_input_tokens == 100
    assert second.usage.input_tokens == first.usage.input_tokens

    calls = fake.calls
    assert [c.api for c in calls] == ["anthropic", "anthropic"]
    assert calls[0].model == CLAUDE and calls[0].stream is False
    assert calls[0].message_count == 1 and calls[0].status == 200
    assert calls[1].usage is not None and calls[1].usage.cache_read_input_tokens == 100


def test_anthropic_scripted_usage_override(claude: anthropic.Anthropic, fake: FakeProvider) -> None:
    fake.set_script(
        {
            "replies": [
                {
                    "text": "forty-two",
                    "usage": {"input_tokens": 1234, "cache_read_input_tokens": 77},
                }
            ]
        }
    )
    reply = claude.messages.create(model=CLAUDE, max_tokens=64, messages=user("meaning of life"))
    assert reply.content[0].type == "text" and reply.content[0].text == "forty-two"
    assert reply.usage.input_tokens == 1234
    assert reply.usage.cache_read_input_tokens == 77
    assert reply.usage.cache_creation_input_tokens == 0
    assert reply.usage.output_tokens == tokens("forty-two")


def test_anthropic_stream_is_assembled_by_sdk(
    claude: anthropic.Anthropic, fake: FakeProvider
) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 3
    fake.set_script({"replies": [{"text": text}]})
    with claude.messages.stream(model=CLAUDE, max_tokens=256, messages=user("tell me")) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 3
    assert "".join(pieces) == text
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == tokens(text)
    assert final.usage.input_tokens == tokens("tell me")
    assert fake.calls[0].stream is True


def test_anthropic_stream_event_sequence(fake: FakeProvider) -> None:
    fake.set_script(
        {"replies": [{"text": "checking", "tool_uses": [{"name": "lookup", "input": {"q": 1}}]}]}
    )
    body = {"model": CLAUDE, "max_tokens": 10, "stream": True, "messages": user("x")}
    response = httpx.post(f"{fake.base_url}/v1/messages", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        line.removeprefix("event: ")
        for line in response.text.splitlines()
        if line.startswith("event: ")
    ]
    assert events == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    data = [
        json.loads(line.removeprefix("data: "))
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]
    assert data[5]["content_block"]["type"] == "tool_use"
    assert data[6]["delta"] == {"type": "input_json_delta", "partial_json": '{"q":1}'}
    assert data[8]["delta"]["stop_reason"] == "tool_use"
    assert set(data[8]["usage"]) >= {
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    }


def test_anthropic_tool_use_round_trip(claude: anthropic.Anthropic, fake: FakeProvider) -> None:
    fake.set_script(
        {
            "replies": [
                {
                    "match": "weather",
                    "tool_uses": [{"name": "get_weather", "input": {"city": "Paris"}}],
                },
                {"match": "18C", "text": "It is 18C and sunny in Paris."},
            ]
        }
    )
    messages: list[Any] = user("What's the weather in Paris?")
    first = claude.messages.create(
        model=CLAUDE, max_tokens=128, tools=[WEATHER_TOOL], messages=messages
    )
    assert first.stop_reason == "tool_use"
    assert len(first.content) == 1
    block = first.content[0]
    assert isinstance(block, anthropic.types.ToolUseBlock)
    assert block.name == "get_weather"
    assert block.input == {"city": "Paris"}
    assert block.id.startswith("toolu_")

    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "18C, sunny"}],
        },
    ]
    second = claude.messages.create(
        model=CLAUDE, max_tokens=128, tools=[WEATHER_TOOL], messages=messages
    )
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text"
    assert second.content[0].text == "It is 18C and sunny in Paris."

    calls = fake.calls
    assert [c.tool_names for c in calls] == [["get_weather"], ["get_weather"]]
    assert [c.message_count for c in calls] == [1, 3]
    assert [c.stop_reason for c in calls] == ["tool_use", "end_turn"]


def test_anthropic_streamed_tool_use(claude: anthropic.Anthropic, fake: FakeProvider) -> None:
    tool_input = {"city": "Reykjavik", "units": "metric", "days": [1, 2, 3]}
    fake.set_script(
        {
            "stream_chunk_chars": 5,
            "replies": [{"tool_uses": [{"name": "get_weather", "input": tool_input}]}],
        }
    )
    with claude.messages.stream(
        model=CLAUDE, max_tokens=128, tools=[WEATHER_TOOL], messages=user("weather?")
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    block = final.content[0]
    assert isinstance(block, anthropic.types.ToolUseBlock)
    assert block.input == tool_input


def test_anthropic_count_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model=CLAUDE, messages=user("x" * 41))
    assert counted.input_tokens == 11


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (400, anthropic.BadRequestError, "invalid_request_error"),
    ],
)
def test_anthropic_injected_errors(
    claude: anthropic.Anthropic,
    fake: FakeProvider,
    status: int,
    error_class: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    fake.set_script({"replies": [{"error": {"status": status}}]})
    with pytest.raises(error_class) as caught:
        claude.messages.create(model=CLAUDE, max_tokens=10, messages=user("hi"))
    err = caught.value
    assert err.status_code == status
    assert err.body == {"type": "error", "error": {"type": error_type, "message": err.api_message}}
    if status == 429:
        assert err.response.headers["retry-after"] == "1"
    if status == 529:
        assert isinstance(err, anthropic.InternalServerError)
    assert fake.calls[0].status == status and fake.calls[0].error_type == error_type
    # A consumed one-shot failure is followed by the default reply.
    ok = claude.messages.create(model=CLAUDE, max_tokens=10, messages=user("hi"))
    assert ok.content[0].type == "text" and ok.content[0].text == "done: hi"


def test_anthropic_stall_beyond_timeout_raises_timeout(
    fake: FakeProvider, claude: anthropic.Anthropic
) -> None:
    fake.set_script({"replies": [{"stall_ms": 3000}, {"stall_ms": 3000}]})
    impatient = anthropic.Anthropic(
        base_url=fake.base_url, api_key="test", max_retries=0, timeout=0.3
    )
    with pytest.raises(anthropic.APITimeoutError):
        impatient.messages.create(model=CLAUDE, max_tokens=10, messages=user("hi"))
    # Mid-stream stall: headers and message_start arrive, then nothing. The anthropic SDK
    # lets the transport's ReadTimeout escape while iterating a stream.
    with (
        pytest.raises((anthropic.APITimeoutError, httpx2.TimeoutException)),
        impatient.messages.stream(model=CLAUDE, max_tokens=10, messages=user("hi")) as stream,
    ):
        stream.get_final_message()
    # The stalled handlers sleep asynchronously: the server keeps answering meanwhile.
    started = time.perf_counter()
    ok = claude.messages.create(model=CLAUDE, max_tokens=10, messages=user("still there?"))
    assert ok.content[0].type == "text"
    assert time.perf_counter() - started < 2.0


# ---------------------------------------------------------------- OpenAI SDK


def test_openai_text_reply_with_cached_tokens(gpt: openai.OpenAI, fake: FakeProvider) -> None:
    messages: Any = [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "S" * 400, "cache_control": {"type": "ephemeral"}}
            ],
        },
        {"role": "user", "content": "hello there"},
    ]
    first = gpt.chat.completions.create(model=GPT, messages=messages)
    second = gpt.chat.completions.create(model=GPT, messages=messages)

    assert first.choices[0].message.content == "done: hello there"
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens == tokens("S" * 400 + "hello there")
    assert first.usage.completion_tokens == tokens("done: hello there")
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == 100
    assert [c.api for c in fake.calls] == ["openai", "openai"]
    assert fake.calls[0].message_count == 2


def test_openai_stream_with_usage(gpt: openai.OpenAI, fake: FakeProvider) -> None:
    text = "Streaming replies arrive in several small chunks."
    fake.set_script({"replies": [{"text": text, "usage": {"cache_read_input_tokens": 64}}]})
    stream = gpt.chat.completions.create(
        model=GPT,
        messages=user("stream please"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert content == text
    assert finish == ["stop"]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == tokens(text)
    assert usage.prompt_tokens == tokens("stream please") + 64
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 64
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_tool_calls(gpt: openai.OpenAI, fake: FakeProvider) -> None:
    args = {"city": "Lisbon", "detail": "hourly forecast for the next two days"}
    reply = {"times": 2, "tool_uses": [{"name": "get_weather", "input": args}]}
    fake.set_script({"stream_chunk_chars": 8, "replies": [reply]})

    plain = gpt.chat.completions.create(
        model=GPT, messages=user("weather?"), tools=[OPENAI_WEATHER_TOOL]
    )
    choice = plain.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == args

    stream = gpt.chat.completions.create(
        model=GPT, messages=user("weather?"), tools=[OPENAI_WEATHER_TOOL], stream=True
    )
    arguments, names, deltas = "", [], 0
    chunks: list[openai.types.chat.ChatCompletionChunk] = list(stream)
    for chunk in chunks:
        for tool_delta in chunk.choices[0].delta.tool_calls or []:
            deltas += 1
            assert tool_delta.function is not None
            if tool_delta.function.name:
                names.append(tool_delta.function.name)
            arguments += tool_delta.function.arguments or ""
    assert names == ["get_weather"]
    assert deltas > 2
    assert json.loads(arguments) == args
    assert fake.calls[0].tool_names == ["get_weather"]


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (529, openai.InternalServerError),
        (400, openai.BadRequestError),
    ],
)
def test_openai_injected_errors(
    gpt: openai.OpenAI, fake: FakeProvider, status: int, error_class: type[openai.APIStatusError]
) -> None:
    fake.set_script({"replies": [{"error": {"status": status, "retry_after_s": 2.5}}]})
    with pytest.raises(error_class) as caught:
        gpt.chat.completions.create(model=GPT, messages=user("hi"))
    assert caught.value.status_code == status
    assert caught.value.response.headers["retry-after"] == "2.5"
    assert isinstance(caught.value.body, dict) and "type" in caught.value.body


def test_openai_stall_beyond_timeout_raises_timeout(fake: FakeProvider) -> None:
    fake.set_script({"replies": [{"stall_ms": 3000}, {"stall_ms": 3000}]})
    impatient = openai.OpenAI(
        base_url=fake.openai_base_url, api_key="test", max_retries=0, timeout=0.3
    )
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=GPT, messages=user("hi"))
    stream = impatient.chat.completions.create(model=GPT, messages=user("hi"), stream=True)
    with pytest.raises(openai.APITimeoutError):
        list(stream)


def test_openai_tool_result_counts_as_latest_user_text(
    gpt: openai.OpenAI, fake: FakeProvider
) -> None:
    fake.set_script(
        {
            "replies": [
                {
                    "match": "weather",
                    "tool_uses": [{"name": "get_weather", "input": {"city": "Rome"}}],
                },
                {"match": "21C", "text": "21C in Rome."},
            ]
        }
    )
    messages: list[Any] = user("weather in Rome?")
    first = gpt.chat.completions.create(model=GPT, messages=messages, tools=[OPENAI_WEATHER_TOOL])
    assert first.choices[0].message.tool_calls is not None
    call = first.choices[0].message.tool_calls[0]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "21C"},
    ]
    second = gpt.chat.completions.create(model=GPT, messages=messages, tools=[OPENAI_WEATHER_TOOL])
    assert second.choices[0].message.content == "21C in Rome."
    assert fake.calls[1].message_count == 3


def test_mid_stream_errors(
    claude: anthropic.Anthropic, gpt: openai.OpenAI, fake: FakeProvider
) -> None:
    failure = {"error": {"status": 529, "mid_stream": True}}
    fake.set_script({"replies": [failure, failure, failure]})
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        claude.messages.stream(model=CLAUDE, max_tokens=10, messages=user("hi")) as stream,
    ):
        stream.get_final_message()
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "overloaded_error"

    with pytest.raises(openai.APIError, match="injected HTTP 529"):
        list(gpt.chat.completions.create(model=GPT, messages=user("hi"), stream=True))

    # Without streaming the same reply is a plain HTTP 529.
    with pytest.raises(openai.InternalServerError):
        gpt.chat.completions.create(model=GPT, messages=user("hi"))
    assert [(c.status, c.error_type) for c in fake.calls] == [
        (200, "overloaded_error"),
        (200, "server_error"),
        (529, "server_error"),
    ]


# ---------------------------------------------------------------- litellm


def test_litellm_openai_text_stream_and_tools(fake: FakeProvider) -> None:
    import litellm

    litellm.suppress_debug_info = True
    common: dict[str, Any] = {
        "model": f"openai/{GPT}",
        "api_base": fake.openai_base_url,
        "api_key": "x",
        "num_retries": 0,
    }
    reply: Any = litellm.completion(messages=user("hello litellm"), **common)
    assert reply.choices[0].message.content == "done: hello litellm"
    assert reply.usage.prompt_tokens == tokens("hello litellm")
    assert reply.usage.completion_tokens == tokens("done: hello litellm")

    chunks = list(
        litellm.completion(
            messages=user("stream via litellm"),
            stream=True,
            stream_options={"include_usage": True},
            **common,
        )
    )
    built: Any = litellm.stream_chunk_builder(chunks)
    assert built is not None
    assert built.choices[0].message.content == "done: stream via litellm"
    assert built.usage.completion_tokens == tokens("done: stream via litellm")

    fake.set_script(
        {"replies": [{"tool_uses": [{"name": "get_weather", "input": {"city": "Oslo"}}]}]}
    )
    tooled: Any = litellm.completion(
        messages=user("weather"), tools=[OPENAI_WEATHER_TOOL], **common
    )
    assert tooled.choices[0].finish_reason == "tool_calls"
    tool_call = tooled.choices[0].message.tool_calls[0]
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Oslo"}


def test_litellm_errors_and_anthropic_route(fake: FakeProvider) -> None:
    import litellm

    litellm.suppress_debug_info = True
    fake.set_script({"replies": [{"error": {"status": 429}}]})
    with pytest.raises(litellm.exceptions.RateLimitError):
        litellm.completion(
            model=f"openai/{GPT}",
            api_base=fake.openai_base_url,
            api_key="x",
            num_retries=0,
            messages=user("hi"),
        )
    fake.set_script({"replies": [{"usage": {"cache_read_input_tokens": 30}}]})
    reply: Any = litellm.completion(
        model=f"anthropic/{CLAUDE}",
        api_base=fake.base_url,
        api_key="x",
        num_retries=0,
        max_tokens=32,
        messages=user("hello from litellm"),
    )
    assert reply.choices[0].message.content == "done: hello from litellm"
    assert reply.usage.prompt_tokens_details.cached_tokens == 30
    assert [c.api for c in fake.calls] == ["openai", "anthropic"]


# ---------------------------------------------------------------- latency and faults


def test_latency_knob_delays_calls(gpt: openai.OpenAI, fake: FakeProvider) -> None:
    fake.update_script(latency_ms=150)
    started = time.perf_counter()
    gpt.chat.completions.create(model=GPT, messages=user("slow"))
    assert time.perf_counter() - started >= 0.15
    assert fake.calls[0].delay_ms == 150

    fake.set_script({"latency_ms": 0, "replies": [{"latency_ms": 200}]})
    started = time.perf_counter()
    gpt.chat.completions.create(model=GPT, messages=user("slower"))
    assert time.perf_counter() - started >= 0.2


def test_latency_does_not_serialize_concurrent_calls(fake: FakeProvider) -> None:
    fake.update_script(latency_ms=300)

    limits = httpx.Limits(max_connections=8)
    with httpx.Client(base_url=fake.openai_base_url, limits=limits) as client:

        def call(i: int) -> int:
            body = {"model": GPT, "messages": user(f"call {i}")}
            return client.post("/chat/completions", json=body).status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(call, range(8)))
        elapsed = time.perf_counter() - started
    assert statuses == [200] * 8
    assert 0.3 <= elapsed < 8 * 0.3 / 2  # well below the 2.4 s a serial server would need


def test_seeded_random_failures_and_stalls_are_reproducible(fake: FakeProvider) -> None:
    fake.set_script({"failure_rate": 0.5, "failure_statuses": [503, 529], "seed": 7})

    def statuses() -> list[int]:
        body = {"model": CLAUDE, "max_tokens": 5, "messages": user("x")}
        with httpx.Client(base_url=fake.base_url) as client:
            return [client.post("/v1/messages", json=body).status_code for _ in range(30)]

    first = statuses()
    fake.reset()
    assert statuses() == first
    assert {200, 503, 529} == set(first)
    assert [c.status for c in fake.calls] == first

    fake.set_script({"stall_rate": 1.0, "stall_ms": 200})
    started = time.perf_counter()
    httpx.post(f"{fake.base_url}/v1/messages", json={"model": CLAUDE, "messages": user("x")})
    assert time.perf_counter() - started >= 0.2


def test_random_failure_keeps_queued_reply_for_retry(fake: FakeProvider) -> None:
    fake.set_script({"failure_rate": 1.0, "failure_statuses": [529], "replies": [{"text": "kept"}]})
    body = {"model": CLAUDE, "max_tokens": 5, "messages": user("x")}
    failed = httpx.post(f"{fake.base_url}/v1/messages", json=body)
    assert failed.status_code == 529
    assert failed.json()["error"]["type"] == "overloaded_error"
    fake.update_script(failure_rate=0.0)
    ok = httpx.post(f"{fake.base_url}/v1/messages", json=body)
    assert ok.json()["content"] == [{"type": "text", "text": "kept"}]


# ---------------------------------------------------------------- scripting and control API


def test_reply_selection_by_model_match_and_times(fake: FakeProvider) -> None:
    fake.set_script(
        {
            "default": {"text": "fallback"},
            "replies": [
                {"model": "claude-haiku", "text": "haiku-1"},
                {"match": "deploy", "text": "deploying", "times": None},
                {"text": "any-1", "times": 2},
                {"model": "claude-haiku", "text": "haiku-2"},
            ],
        }
    )

    def ask(model: str, text: str) -> str:
        body = {"model": model, "max_tokens": 5, "messages": user(text)}
        reply = httpx.post(f"{fake.base_url}/v1/messages", json=body).json()
        return str(reply["content"][0]["text"])

    assert ask("claude-haiku", "hi") == "haiku-1"
    assert ask("claude-haiku", "hi") == "any-1"
    assert ask("claude-opus", "please deploy now") == "deploying"
    assert ask("claude-opus", "hi") == "any-1"
    assert ask("claude-opus", "hi") == "fallback"
    assert ask("claude-haiku", "deploy again") == "deploying"
    assert ask("claude-haiku", "hi") == "haiku-2"
    assert ask("claude-haiku", "hi") == "fallback"
    fake.reset()
    assert ask("claude-haiku", "hi") == "haiku-1"


def test_control_endpoints(fake: FakeProvider) -> None:
    with httpx.Client(base_url=fake.base_url) as client:
        assert client.get("/_fake/health").json() == {"status": "ok"}
        script = {"latency_ms": 0, "replies": [{"text": "from http"}]}
        assert client.post("/_fake/script", json=script).status_code == 200
        assert client.get("/_fake/script").json()["replies"][0]["text"] == "from http"
        assert client.post("/_fake/script", json={"failure_rate": 3}).status_code == 422

        body = {"model": GPT, "messages": user("one"), "tools": [OPENAI_WEATHER_TOOL]}
        reply = client.post("/v1/chat/completions", json=body).json()
        assert reply["choices"][0]["message"]["content"] == "from http"
        client.post("/chat/completions", json={"model": GPT, "messages": user("two")})

        calls = client.get("/_fake/calls").json()
        assert [c["last_user_text"] for c in calls] == ["one", "two"]
        assert calls[0]["api"] == "openai" and calls[0]["model"] == GPT
        assert calls[0]["stream"] is False and calls[0]["message_count"] == 1
        assert calls[0]["tool_names"] == ["get_weather"] and calls[0]["status"] == 200
        assert calls[0]["usage"]["output_tokens"] == tokens("from http")
        assert [c["seq"] for c in client.get("/_fake/calls", params={"since": 1}).json()] == [2]

        assert client.post("/_fake/reset").status_code == 200
        assert client.get("/_fake/calls").json() == []
    assert fake.script.replies[0].text == "from http"


def test_malformed_requests_get_provider_shaped_400(fake: FakeProvider) -> None:
    anthropic_reply = httpx.post(f"{fake.base_url}/v1/messages", content=b"{not json")
    assert anthropic_reply.status_code == 400
    assert anthropic_reply.json()["error"]["type"] == "invalid_request_error"
    openai_reply = httpx.post(f"{fake.openai_base_url}/chat/completions", json={"model": GPT})
    assert openai_reply.status_code == 400
    assert openai_reply.json()["error"]["type"] == "invalid_request_error"


def test_record_bodies(fake: FakeProvider) -> None:
    fake.set_script({"record_bodies": True})
    body = {"model": CLAUDE, "max_tokens": 5, "messages": user("keep me"), "metadata": {"k": 1}}
    httpx.post(f"{fake.base_url}/v1/messages", json=body)
    assert fake.calls[0].request == body


def test_constructor_knobs_and_prompt_shutdown_during_stall() -> None:
    provider = FakeProvider({"replies": [{"text": "late"}]}, stall_ms=10_000, stall_rate=1.0)
    assert provider.script.stall_ms == 10_000 and provider.script.replies[0].text == "late"
    with provider, ThreadPoolExecutor(max_workers=1) as pool:
        body = {"model": CLAUDE, "max_tokens": 5, "messages": user("x")}
        pending = pool.submit(httpx.post, f"{provider.base_url}/v1/messages", json=body, timeout=20)
        deadline = time.monotonic() + 5
        while not provider.calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.perf_counter()
        provider.stop()
        assert time.perf_counter() - started < 3.0
        assert pending.result(timeout=5).json()["content"][0]["text"] == "late"


# ---------------------------------------------------------------- console script


def test_parse_config_env_and_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script_file = tmp_path / "script.json"
    script_file.write_text(json.dumps({"latency_ms": 5, "replies": [{"text": "scripted"}]}))
    monkeypatch.setenv("FLEETPLANE_FAKE_PORT", "9123")
    monkeypatch.setenv("FLEETPLANE_FAKE_SCRIPT", str(script_file))
    monkeypatch.setenv("FLEETPLANE_FAKE_FAILURE_RATE", "0.25")

    config = parse_config(["--latency-ms", "40", "--seed", "3"])
    assert (config.host, config.port) == ("127.0.0.1", 9123)
    assert config.script.latency_ms == 40
    assert config.script.failure_rate == 0.25
    assert config.script.seed == 3
    assert config.script.replies[0].text == "scripted"

    inline = parse_config(["--port", "1", "--script", '{"stall_rate": 0.5, "stall_ms": 10}'])
    assert inline.port == 1
    assert inline.script.stall_rate == 0.5 and inline.script.latency_ms == 0
    assert isinstance(inline.script, Script)


def test_console_script_serves(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(SERVICES), FLEETPLANE_FAKE_LATENCY_MS="12")
    code = "import sys; from fleetplane.fakeprovider.server import main; main(sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        deadline = time.monotonic() + 10
        while True:
            try:
                script = httpx.get(f"http://127.0.0.1:{port}/_fake/script").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert script["latency_ms"] == 12
        client = anthropic.Anthropic(
            base_url=f"http://127.0.0.1:{port}", api_key="test", max_retries=0
        )
        reply = client.messages.create(model=CLAUDE, max_tokens=5, messages=user("cli"))
        assert reply.content[0].type == "text" and reply.content[0].text == "done: cli"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
