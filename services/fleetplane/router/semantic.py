"""The guarded semantic cache (pure): near-duplicate prompts answered from an earlier answer.

Beyond the exact cache (cache.py), a task may be answered with the answer to a *near-duplicate*
prompt: opt-in per task type (FLEETPLANE_ROUTER_SEMANTIC_CACHE_TYPES), and only within one scope:
the same team (whatever the exact cache's scope), the same task type, the same tool set, the
same system prompt and temperature, and a tier at or above the one decided. Inside a scope a
stored prompt matches when all three guards pass:

1. **similarity**: the cosine of the two prompts' embeddings (the router's prompt features) is
   at least the threshold (FLEETPLANE_ROUTER_SEMANTIC_CACHE_THRESHOLD, 0.97);
2. **salient tokens**: the numbers, the capitalised or mixed-case words (names; not a
   title-case word that starts a sentence) and the quoted strings are the same, with the same
   counts: "refund order 1234" never answers
   "refund order 1243", "email Alice" never answers "email Bob", however similar the
   embeddings (static embeddings barely move for such changes);
3. **wording**: after lower-casing, dropping punctuation and a short list of filler words
   (please, kindly, thanks, ...), the word sequences differ by at most `max_edits` words
   (FLEETPLANE_ROUTER_SEMANTIC_CACHE_MAX_EDITS, default 0: the same words in the same order).

So "Summarize  this report, please." answers "summarize this report", and "Which of these is
a renewable resource" never answers "... a nonrenewable resource" (with max_edits 0). The
false-hit rate of the guards is measured on near-miss pairs by `fleetplane route eval`
(semantic_pairs below) and reported with the tables.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from fleetplane.core.events import TaskSpec
from fleetplane.router.cache import CacheEntry, tool_set_hash
from fleetplane.router.features import Vector

FILLER = frozenset({"please", "kindly", "thanks", "thank", "you", "pls", "just", "hi",
                    "hello"})
_SALIENT = re.compile(r"\"[^\"]*\"|'[^']*'|\d+(?:[.,]\d+)*|\b\w*[A-Z]\w*\b")
_WORD = re.compile(r"[a-z0-9]+")
MAX_PER_SCOPE = 2000


_SENTENCE_START = re.compile(r"(^\s*|[.!?:]\s+|\n\s*)([A-Z])(?=[a-z]*\b)")


def salient(text: str) -> Counter[str]:
    """Numbers, names (words with a capital letter) and quoted strings, with their counts. A
    title-case word that starts a sentence is not counted as a name (it is capitalised by
    grammar); a name there is still guarded by the wording (guard 3)."""
    text = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).lower(), text)
    return Counter(_SALIENT.findall(text))


def wording(text: str) -> tuple[str, ...]:
    return tuple(w for w in _WORD.findall(text.lower()) if w not in FILLER)


def edits(a: tuple[str, ...], b: tuple[str, ...], limit: int) -> int:
    """Word-level edit distance, stopping early above `limit` (returns limit + 1 then)."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    if limit == 0:
        return 0 if a == b else 1
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, wb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb))
        if min(cur) > limit:
            return limit + 1
        prev = cur
    return prev[-1]


def scope_key(spec: TaskSpec, tier: str, team: str) -> str:
    """Team, task type, tool set, system prompt, temperature and tier: never crossed."""
    parts = {"team": team, "task_type": spec.task_type, "tools": tool_set_hash(spec),
             "system": hashlib.sha256((spec.system_prompt or "").encode()).hexdigest(),
             "temperature": spec.temperature, "tier": tier}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Stored:
    vector: Vector
    salient: Counter[str]
    wording: tuple[str, ...]
    entry: CacheEntry


@dataclass(frozen=True)
class Match:
    entry: CacheEntry
    similarity: float


class SemanticCache:
    def __init__(self, task_types: Iterable[str], threshold: float = 0.97, max_edits: int = 0,
                 ttl_s: float = 86_400.0, max_per_scope: int = MAX_PER_SCOPE) -> None:
        self.task_types = frozenset(task_types)
        self.threshold = threshold
        self.max_edits = max_edits
        self.ttl_s = ttl_s
        self.max_per_scope = max_per_scope
        self._scopes: dict[str, list[Stored]] = {}

    def enabled(self, task_type: str) -> bool:
        return task_type in self.task_types

    def put(self, scope: str, prompt: str, vector: Vector, entry: CacheEntry) -> None:
        items = self._scopes.setdefault(scope, [])
        items.append(Stored(vector, salient(prompt), wording(prompt), entry))
        if len(items) > self.max_per_scope:
            del items[0]

    def get(self, scope: str, prompt: str, vector: Vector, now: datetime) -> Match | None:
        """The most similar stored answer of the scope that passes every guard."""
        items = self._scopes.get(scope)
        if not items:
            return None
        live = [s for s in items if (now - s.entry.created_at).total_seconds() <= self.ttl_s]
        if len(live) != len(items):
            self._scopes[scope] = items = live
            if not items:
                return None
        sims = np.stack([s.vector for s in items]) @ vector
        names, words = salient(prompt), wording(prompt)
        for i in np.argsort(-sims):
            sim = float(sims[i])
            if sim < self.threshold:
                return None
            s = items[int(i)]
            if s.salient == names and edits(s.wording, words, self.max_edits) <= self.max_edits:
                return Match(s.entry, sim)
        return None

    def __len__(self) -> int:
        return sum(len(v) for v in self._scopes.values())
