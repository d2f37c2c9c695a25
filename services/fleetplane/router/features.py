"""Prompt features for routing: a local embedding plus cheap text features, computed once per task.

The embedding is WordLlama's bundled 256-dimensional model (`wordllama` on PyPI ships its weights,
`l2_supercat_256`, and tokenizer config inside the wheel; the router reads those two files from
the installed package, so loading needs no network and never tries it).
When the package cannot load (`FLEETPLANE_ROUTER_EMBEDDING=hashing`, or an import error), a
hashed bag of words and word bigrams of the same width stands in, and the log says which one is
used. Cheap text features (length, digits, code and punctuation shares, lines) are appended.
Vectors are L2-normalised in their embedding part; `FeatureCache` keeps one per task id so an
attempt, a retry or an escalation of the same task does not embed again.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import OrderedDict
from itertools import chain, pairwise
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fleetplane.core.logging import get_logger

log = get_logger(__name__)

Vector = npt.NDArray[np.float32]
EMBED_DIM = 256
TEXT_FEATURES = 6
DIM = EMBED_DIM + TEXT_FEATURES
WORDLLAMA_WEIGHTS = "l2_supercat_256.safetensors"
WORDLLAMA_TOKENIZER = "l2_supercat_tokenizer_config.json"
MAX_CHARS = 8000  # the head of a long prompt is enough to tell what kind of task it is
WORD_CACHE = 200_000  # tokenized pieces (words) kept by WordLlamaEmbedder
_WORD = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]")
_PIECE = re.compile("▁+[^▁]*")  # a run of (normalised) spaces and the word after it


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]: ...


class HashingEmbedder:
    """Hashed words and word bigrams (CRC32, signed), L2-normalised: no model, no network."""

    name = "hashing"

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            words = [w.lower() for w in _WORD.findall(text[:MAX_CHARS])]
            grams = words + [f"{a} {b}" for a, b in pairwise(words)]
            for g in grams:
                h = zlib.crc32(g.encode())
                out[i, h % EMBED_DIM] += 1.0 if (h >> 16) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        normed: npt.NDArray[np.float32] = out / np.maximum(norms, 1e-9)
        return normed


class WordLlamaEmbedder:
    """WordLlama's bundled 256-d static embedding (weights in the wheel)."""

    name = "wordllama-l2_supercat_256"

    def __init__(self) -> None:
        # Loaded from the files inside the installed package, never through WordLlama.load():
        # 0.4.0's loader looks for the tokenizer in `tokenizer/` while the wheel ships it in
        # `tokenizers/`, and on a miss it downloads from the Hugging Face hub.
        import wordllama
        from safetensors import safe_open
        from tokenizers import Tokenizer

        root = Path(wordllama.__file__).parent
        tokenizer = Tokenizer.from_file(str(root / "tokenizers" / WORDLLAMA_TOKENIZER))
        with safe_open(str(root / "weights" / WORDLLAMA_WEIGHTS), framework="np",
                       device="cpu") as f:
            table = f.get_tensor("embedding.weight")
        self._table = np.ascontiguousarray(table, dtype=np.float32)
        # No padding: WordLlamaInference pads a batch to its longest text, so a batch of
        # mixed lengths gathers and averages mostly padding (measured: 9.7 ms per prompt in
        # batches of 256 prompts of 10-700 words, against 0.65 ms one at a time). Each text is
        # averaged over its own tokens instead (mean pooling as WordLlama's, without the
        # padding; vectors agree to within 0.035 per component), at the cost of its length.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._whole = tokenizer
        # the per-piece tokenizer: the same model, its text already normalised ("▁" + piece)
        pieces = Tokenizer.from_str(tokenizer.to_str())
        pieces.normalizer = None
        self._tokenizer = pieces
        self._piece_ids: dict[str, list[int]] = {}
        self._vocab = self._table.shape[0]
        # the ids the tokenizer puts before a text (Llama: BOS); anything else: no fast path
        with_special = tokenizer.encode("a").ids
        plain = tokenizer.encode("a", add_special_tokens=False).ids
        cut = len(with_special) - len(plain)
        self._special: list[int] | None = (with_special[:cut] if cut >= 0
                                           and with_special[cut:] == plain
                                           and tokenizer.encode("").ids == with_special[:cut]
                                           else None)

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            ids = self.token_ids(text[:MAX_CHARS])
            if ids.size:
                out[i] = self._table[ids].mean(axis=0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        normed: npt.NDArray[np.float32] = out / np.maximum(norms, 1e-9)
        return normed

    def token_ids(self, text: str) -> npt.NDArray[np.int64]:
        """The tokenizer's ids for `text`, tokenized word by word through a cache.

        The tokenizer (Llama's BPE without a pre-tokenizer) runs its merges over the whole
        text at once: 1.2-1.5 ms for a 4 kB prompt, most of an inline decision. Its normaliser
        turns each space into "▁" and prepends one, and no merge of its vocabulary joins a
        character to a "▁" after it, so the ids of a text are the concatenation of the ids of
        its pieces, each a run of "▁" and the word after it (checked id for id on the 3,150
        development prompts and in tests/unit/test_router_features.py). Pieces recur
        (words), so each is tokenized once and its ids kept (`WORD_CACHE` pieces, cleared
        when full). A text holding a literal "▁" goes through the tokenizer whole."""
        if "▁" in text or self._special is None:
            return self._tokenize_whole(text)
        if not text:
            return np.asarray(self._special, dtype=np.int64)
        pieces = _PIECE.findall("▁" + text.replace(" ", "▁"))
        cache = self._piece_ids
        missing = [p for p in set(pieces) if p not in cache]
        if missing:
            if len(cache) + len(missing) > WORD_CACHE:
                cache.clear()
            for piece, enc in zip(missing, self._tokenizer.encode_batch_fast(
                    missing, add_special_tokens=False), strict=True):
                cache[piece] = enc.ids
        ids = np.fromiter(chain(self._special, chain.from_iterable(map(cache.__getitem__,
                                                                         pieces))),
                          dtype=np.int64)
        np.clip(ids, 0, self._vocab - 1, out=ids)
        return ids

    def _tokenize_whole(self, text: str) -> npt.NDArray[np.int64]:
        enc = self._whole.encode(text)
        return np.clip(np.asarray(enc.ids, dtype=np.int64), 0, self._vocab - 1)


def load_embedder(kind: str = "wordllama") -> Embedder:
    """The embedder named by `kind` (wordllama | hashing); hashing when WordLlama cannot load."""
    if kind == "hashing":
        return HashingEmbedder()
    if kind != "wordllama":
        raise ValueError(f"unknown embedding {kind!r}: use wordllama or hashing")
    try:
        return WordLlamaEmbedder()
    except Exception as exc:
        log.warning("wordllama embedding unavailable; hashed text features instead",
                    error=str(exc))
        return HashingEmbedder()


def text_features(text: str) -> list[float]:
    n = max(1, len(text))
    # str.count per character (C loops): a generator over the characters cost as much CPU as
    # the embedding itself on long prompts
    digits = sum(map(text.count, "0123456789")) / n
    punct = sum(map(text.count, "{}()[];:=<>")) / n
    code = 1.0 if ("def " in text or "return " in text or "```" in text) else 0.0
    lines = math.log1p(text.count("\n")) / 6
    question = 1.0 if "?" in text else 0.0
    return [math.log1p(len(text)) / 10, digits * 5, punct * 5, code, lines, question]


class FeatureCache:
    """Feature vectors by task id (bounded, least recently used evicted first)."""

    def __init__(self, embedder: Embedder, max_entries: int = 50_000) -> None:
        self.embedder = embedder
        self.max_entries = max_entries
        self._by_task: OrderedDict[str, Vector] = OrderedDict()
        self.computed = 0

    def vectors(self, items: list[tuple[str, str]]) -> list[Vector]:
        """Vectors for (task_id, prompt) pairs; the missing ones are embedded in one batch."""
        missing = [(tid, p) for tid, p in items if tid not in self._by_task]
        if missing:
            emb = self.embedder.embed([p for _, p in missing])
            for (tid, prompt), e in zip(missing, emb, strict=True):
                vec = np.concatenate([e, np.asarray(text_features(prompt), dtype=np.float32)])
                self._by_task[tid] = vec.astype(np.float32)
                self.computed += 1
            while len(self._by_task) > self.max_entries:
                self._by_task.popitem(last=False)
        out = []
        for tid, _ in items:
            self._by_task.move_to_end(tid)
            out.append(self._by_task[tid])
        return out

    def vector(self, task_id: str, prompt: str) -> Vector:
        return self.vectors([(task_id, prompt)])[0]

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._by_task
