"""The response cache: which tasks may be answered from it, its exact key, and the entries (pure).

A task is cacheable only when its answer is a pure function of what the key holds: temperature 0,
no workspace (a task that changes a repository has side effects a cached answer cannot replay), no
dependency inputs, no context files, not pinned to one model, and not opted out with the label
``fleetplane/cache: "off"``. The key is a SHA-256 of (model tier, system prompt hash, tool set
hash, prompt, temperature) and, with ``scope="team"`` (the default), the team: an answer is never
reused across different tool sets (the tool set is the sorted tools and commands the agent may
use) nor, by default, across teams.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from fleetplane.core.events import TaskSpec

CACHE_MODEL = "cache"
CACHE_OFF_LABEL = "fleetplane/cache"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tool_set_hash(spec: TaskSpec) -> str:
    return _sha(json.dumps({"tools": sorted(set(spec.allowed_tools)),
                            "commands": sorted(set(spec.allowed_commands))}))


def not_cacheable(spec: TaskSpec) -> str | None:
    """Why the task may not be served from (or fill) the cache; None when it may."""
    if spec.temperature != 0:
        return "temperature is not 0"
    if spec.repository or spec.write_scope:
        return "the task works on a repository"
    if spec.depends_on:
        return "the task takes dependency inputs"
    if spec.context_files:
        return "the task reads context files"
    if spec.model_preference == "pinned":
        return "the task is pinned to a model"
    if spec.labels.get(CACHE_OFF_LABEL, "").lower() in {"off", "false", "no"}:
        return f"label {CACHE_OFF_LABEL} is off"
    return None


def cache_key(spec: TaskSpec, tier: str, team: str, scope: str = "team") -> str:
    parts = {
        "tier": tier,
        "system": _sha(spec.system_prompt or ""),
        "tools": tool_set_hash(spec),
        "prompt": spec.prompt,
        "temperature": spec.temperature,
        "team": team if scope == "team" else "",
    }
    return _sha(json.dumps(parts, sort_keys=True))


@dataclass(frozen=True)
class CacheEntry:
    output: str
    model: str  # the model that produced the answer
    cost_usd: float  # what producing it cost (what a hit saves, at most)
    created_at: datetime
    source_task_id: str


class ResponseCache:
    """Entries by key with a TTL and a size bound (oldest evicted first)."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, CacheEntry] = {}

    def get(self, key: str, now: datetime) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if (now - entry.created_at).total_seconds() > self.ttl_s:
            del self._entries[key]
            return None
        return entry

    def put(self, key: str, entry: CacheEntry) -> None:
        old = self._entries.get(key)
        if old is not None and old.created_at >= entry.created_at:
            return  # keep the newer answer (replays and reordered rebuilds agree)
        self._entries.pop(key, None)
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]

    def __len__(self) -> int:
        return len(self._entries)
