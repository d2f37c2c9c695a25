"""How often the guarded semantic cache answers what it should not (and what it should).

From an evaluation file's prompts (fleetplane.router.evaluate), pairs of (stored prompt, new
prompt) of one scope; the stored prompt's answer is in the cache, the new prompt is looked up:

* near misses, which must NOT be answered (a hit is a false hit): one number changed; one name
  (a capitalised word inside a sentence) swapped for another name of the file; one ordinary
  word swapped for another word of the file; another prompt of the same task type;
* benign variants, which should be answered (a miss only costs a model call): spacing, a
  lower-cased first letter, trailing punctuation, a filler word ("please").

Deterministic for a seed; at most `per_kind` pairs of each kind.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from fleetplane.router.cache import CacheEntry
from fleetplane.router.features import EMBED_DIM, FeatureCache
from fleetplane.router.semantic import SemanticCache, wording

NEAR_MISS = ("number", "name", "word", "other prompt")
BENIGN = ("spacing", "lower-case start", "punctuation", "filler word")
_NUMBER = re.compile(r"\d+")
_NAME = re.compile(r"(?<=[a-z,] )[A-Z][a-z]{2,}\b")
_WORDS = re.compile(r"\b[a-z]{4,}\b")


@dataclass(frozen=True)
class KindResult:
    kind: str
    must_hit: bool
    pairs: int
    hits: int

    @property
    def rate(self) -> float:
        return self.hits / self.pairs if self.pairs else 0.0


def _swap_one(prompt: str, pattern: re.Pattern[str], rng: random.Random,
              replacement: Callable[[str], str]) -> str | None:
    """The prompt with one match of `pattern` (drawn) replaced: the shape of every near miss
    that edits the prompt (a number, a name, an ordinary word)."""
    found = list(pattern.finditer(prompt))
    if not found:
        return None
    m = rng.choice(found)
    return prompt[:m.start()] + replacement(m.group()) + prompt[m.end():]


def _variant(kind: str, prompt: str, rng: random.Random, names: list[str], words: list[str],
             others: list[str]) -> str | None:
    if kind == "number":
        return _swap_one(prompt, _NUMBER, rng, lambda g: str(int(g) + rng.randint(1, 9)))
    if kind in ("name", "word"):
        pool, pattern = (names, _NAME) if kind == "name" else (words, _WORDS)
        if len(pool) < 2:
            return None
        return _swap_one(prompt, pattern, rng, lambda g: rng.choice([w for w in pool if w != g]))
    if kind == "other prompt":
        pool = [o for o in others if o != prompt]
        return rng.choice(pool) if pool else None
    if kind == "spacing":
        return "  " + prompt.replace(" ", "  ", 3) + " \n"
    if kind == "lower-case start":
        return prompt[:1].lower() + prompt[1:] if prompt[:1].isupper() else None
    if kind == "punctuation":
        return prompt.rstrip().rstrip(".?!") + "!"
    if kind == "filler word":
        return "Please " + prompt[:1].lower() + prompt[1:] if prompt[:1].isupper() else (
            prompt + " please")
    raise ValueError(kind)


def semantic_pairs(prompts: list[tuple[str, str]], features: FeatureCache, *,
                   threshold: float = 0.97, max_edits: int = 0, per_kind: int = 200,
                   seed: int = 0) -> list[KindResult]:
    """`prompts`: (task type, prompt). Each kind's pairs and how many the cache answered."""
    rng = random.Random(seed)
    names = sorted({m.group() for _, p in prompts for m in _NAME.finditer(p)})
    words = sorted({m.group() for _, p in prompts[:2000] for m in _WORDS.finditer(p)})
    by_type: dict[str, list[str]] = {}
    for t, p in prompts:
        by_type.setdefault(t, []).append(p)
    now = datetime.now(UTC)
    out = []
    n = 0

    def vec(text: str) -> object:
        nonlocal n
        n += 1
        return features.vector(f"semantic-eval-{n}", " ".join(wording(text)) or text)[:EMBED_DIM]

    for kind in (*NEAR_MISS, *BENIGN):
        order = list(range(len(prompts)))
        rng.shuffle(order)
        pairs = hits = 0
        for i in order:
            if pairs >= per_kind:
                break
            task_type, prompt = prompts[i]
            variant = _variant(kind, prompt, rng, names, words, by_type[task_type])
            if variant is None or variant == prompt:
                continue
            cache = SemanticCache([task_type], threshold, max_edits)
            entry = CacheEntry("answer", "m", 0.0, now, "stored")
            cache.put("scope", prompt, vec(prompt), entry)  # type: ignore[arg-type]
            pairs += 1
            hits += cache.get("scope", variant, vec(variant), now) is not None  # type: ignore[arg-type]
        out.append(KindResult(kind, kind in BENIGN, pairs, hits))
    return out
