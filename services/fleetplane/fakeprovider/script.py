"""Script models for the fake model provider, plus the runtime that plays them.

A :class:`Script` describes how the fake provider answers: a default reply, an
ordered list of scripted replies (optionally filtered by model and/or by a
substring of the last user message), and global fault-injection knobs.
:class:`ScriptRunner` holds the mutable state (remaining replies, seeded RNG,
prompt-cache memory, recorded calls) and is safe to share between the server's
event loop thread and a test thread.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ApiKind = Literal["anthropic", "openai"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolUse(_Model):
    """A tool call the fake model makes (Anthropic ``tool_use`` / OpenAI ``tool_calls``)."""

    name: str
    input: dict[str, Any] = Field(default_factory=dict)
    id: str | None = None


class UsageOverride(_Model):
    """Explicit token counts; any field left ``None`` keeps the computed value."""

    input_tokens: int | None = Field(default=None, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)
    cache_creation_input_tokens: int | None = Field(default=None, ge=0)
    cache_read_input_tokens: int | None = Field(default=None, ge=0)


class InjectedError(_Model):
    """An HTTP error returned instead of a completion.

    429 always carries ``retry-after`` (``retry_after_s``, default 1 s); other
    statuses carry it only when ``retry_after_s`` is set. ``error_type``
    overrides the provider-specific error type (e.g. ``overloaded_error``).
    With ``mid_stream`` a streaming request gets HTTP 200 and the stream head, then the
    error as an SSE event (Anthropic ``event: error``, OpenAI ``data: {"error": ...}``);
    non-streaming requests get the plain HTTP error.
    """

    status: int = Field(ge=400, le=599)
    message: str | None = None
    error_type: str | None = None
    retry_after_s: float | None = Field(default=None, ge=0)
    mid_stream: bool = False


class Reply(_Model):
    """One scripted reply.

    ``model`` / ``match`` filter which requests may consume it (``match`` is a
    substring of the last user message). ``times`` is how many requests it
    answers before being removed (``None``: never removed). With neither
    ``text`` nor ``tool_uses`` the reply echoes ``"done: <last user text[:40]>"``.
    """

    model: str | None = None
    match: str | None = None
    times: int | None = Field(default=1, ge=1)
    text: str | None = None
    tool_uses: list[ToolUse] = Field(default_factory=list)
    usage: UsageOverride | None = None
    stop_reason: str | None = None
    latency_ms: float | None = Field(default=None, ge=0)
    stall_ms: float = Field(default=0.0, ge=0)
    error: InjectedError | None = None


class Script(_Model):
    """Complete fake-provider behaviour; also the JSON body of ``POST /_fake/script``."""

    default: Reply = Field(default_factory=Reply)
    replies: list[Reply] = Field(default_factory=list)
    latency_ms: float = Field(default=0.0, ge=0)
    failure_rate: float = Field(default=0.0, ge=0, le=1)
    failure_statuses: list[int] = Field(default_factory=lambda: [429, 500, 529], min_length=1)
    stall_rate: float = Field(default=0.0, ge=0, le=1)
    stall_ms: float = Field(default=0.0, ge=0)
    seed: int = 0
    stream_chunk_chars: int = Field(default=16, ge=1)
    record_bodies: bool = False
    max_recorded_calls: int = Field(default=100_000, ge=1)


class Usage(_Model):
    """Token usage as reported for one call (Anthropic field names)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class CallRecord(_Model):
    """What the fake provider saw and answered for one request."""

    seq: int
    received_at: float
    api: ApiKind
    model: str
    stream: bool
    message_count: int
    tool_names: list[str]
    last_user_text: str
    status: int
    error_type: str | None = None
    stop_reason: str | None = None
    usage: Usage | None = None
    delay_ms: float = 0.0
    request: dict[str, Any] | None = None
    traceparent: str | None = None  # the caller's W3C trace context header, if any


@dataclass(frozen=True, slots=True)
class Plan:
    """The runner's decision for one request."""

    seq: int
    reply: Reply
    error: InjectedError | None
    latency_s: float
    stall_s: float
    chunk_chars: int
    record_bodies: bool


@dataclass(slots=True)
class _Slot:
    reply: Reply
    remaining: int | None


class ScriptRunner:
    """Mutable, thread-safe state behind a running fake provider."""

    def __init__(self, script: Script | None = None) -> None:
        self._lock = threading.Lock()
        self._script = script if script is not None else Script()
        self._seq = 0
        self._cache_keys: set[str] = set()
        self._calls: deque[CallRecord] = deque(maxlen=self._script.max_recorded_calls)
        self._pending: list[_Slot] = []
        self._rng = random.Random()
        self._rewind()
        self.closing = False
        """Set when the server shuts down: pending latency/stall sleeps end early."""

    @property
    def script(self) -> Script:
        return self._script

    def set_script(self, script: Script) -> None:
        """Replace the script; queued replies and the RNG restart, calls are kept."""
        with self._lock:
            self._script = script
            if self._calls.maxlen != script.max_recorded_calls:
                self._calls = deque(self._calls, maxlen=script.max_recorded_calls)
            self._rewind()

    def reset(self) -> None:
        """Forget calls and prompt-cache memory and replay the current script from the start."""
        with self._lock:
            self._calls.clear()
            self._cache_keys.clear()
            self._seq = 0
            self._rewind()

    def calls(self) -> list[CallRecord]:
        with self._lock:
            return list(self._calls)

    def record(self, call: CallRecord) -> None:
        with self._lock:
            self._calls.append(call)

    def remember_prefix(self, key: str) -> bool:
        """Mark a cacheable prompt prefix as written; return True if it was already cached."""
        with self._lock:
            if key in self._cache_keys:
                return True
            if len(self._cache_keys) >= 100_000:
                self._cache_keys.clear()
            self._cache_keys.add(key)
            return False

    def plan(self, model: str, last_user_text: str) -> Plan:
        """Pick the reply (and any injected fault) for one request."""
        with self._lock:
            self._seq += 1
            script = self._script
            error: InjectedError | None = None
            reply: Reply
            if script.failure_rate and self._rng.random() < script.failure_rate:
                # Random faults leave queued replies untouched so a retry still gets them.
                error = InjectedError(status=self._rng.choice(script.failure_statuses))
                reply = script.default
            else:
                reply = self._take(model, last_user_text)
                error = reply.error
            stall_ms = reply.stall_ms
            if script.stall_rate and self._rng.random() < script.stall_rate:
                stall_ms = max(stall_ms, script.stall_ms)
            latency_ms = reply.latency_ms if reply.latency_ms is not None else script.latency_ms
            return Plan(
                seq=self._seq,
                reply=reply,
                error=error,
                latency_s=latency_ms / 1000.0,
                stall_s=stall_ms / 1000.0,
                chunk_chars=script.stream_chunk_chars,
                record_bodies=script.record_bodies,
            )

    def _take(self, model: str, text: str) -> Reply:
        for index, slot in enumerate(self._pending):
            reply = slot.reply
            if reply.model is not None and reply.model != model:
                continue
            if reply.match is not None and reply.match not in text:
                continue
            if slot.remaining is not None:
                slot.remaining -= 1
                if slot.remaining <= 0:
                    del self._pending[index]
            return reply
        return self._script.default

    def _rewind(self) -> None:
        self._pending = [_Slot(reply, reply.times) for reply in self._script.replies]
        self._rng = random.Random(self._script.seed)
