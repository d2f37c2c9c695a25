"""Deterministic retry backoff and event ids (pure: same inputs, same outputs).

Determinism matters under at-least-once delivery: when an input is processed twice (a crash
before its offset was committed), the re-derived events carry the same event ids and delays, so
consumers deduplicating by event_id see one event, not two.
"""

from __future__ import annotations

import hashlib
import uuid

BASE_DELAY_MS = 1_000
MAX_DELAY_MS = 60_000

_NAMESPACE = uuid.UUID("6f1c0e4e-4d0a-4a55-9d2c-f1ee7c0a7d01")


def backoff_ms(task_id: str, attempt: int, *, base_ms: int = BASE_DELAY_MS,
               cap_ms: int = MAX_DELAY_MS) -> int:
    """Delay before retrying after failed attempt `attempt` (1-based): exponential, capped,
    with "equal jitter" (half fixed, half pseudo-random) seeded by task id and attempt."""
    ceiling: int = min(cap_ms, base_ms * 2 ** max(0, attempt - 1))
    digest = hashlib.sha256(f"{task_id}:{attempt}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return ceiling // 2 + int(fraction * (ceiling - ceiling // 2))


_NAMESPACE_BYTES = _NAMESPACE.bytes


def derived_event_id(cause_event_id: str, kind: str) -> str:
    """The event id of the `kind` event derived from `cause_event_id`: the hex of
    ``uuid.uuid5(_NAMESPACE, f"{cause_event_id}/{kind}")`` (RFC 4122: SHA-1 of namespace and
    name, version and variant bits set), computed without building a ``UUID`` (a third of
    the cost; the scheduler derives one or two ids per event)."""
    digest = bytearray(hashlib.sha1(
        _NAMESPACE_BYTES + f"{cause_event_id}/{kind}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return digest.hex()
