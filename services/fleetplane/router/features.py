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
from collections import Counter, OrderedDict
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
WORD_CACHE = 32_768  # pieces (words) whose token vectors' sum WordLlamaEmbedder keeps: 32 MB
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
        self._vocab = self._table.shape[0]
        self._piece_row: dict[str, int] = {}  # piece -> its row in the two arrays below
        self._piece_sum = np.zeros((0, EMBED_DIM), dtype=np.float32)  # its vectors' sum
        self._piece_len = np.zeros(0, dtype=np.float32)  # its token count
        # the ids the tokenizer puts before a text (Llama: BOS); anything else: no fast path
        with_special = tokenizer.encode("a").ids
        plain = tokenizer.encode("a", add_special_tokens=False).ids
        cut = len(with_special) - len(plain)
        self._special: list[int] | None = (with_special[:cut] if cut >= 0
                                           and with_special[cut:] == plain
                                           and tokenizer.encode("").ids == with_special[:cut]
                                           else None)
        self._special_sum = (self._table[self._special].sum(axis=0) if self._special
                             else np.zeros(EMBED_DIM, dtype=np.float32))

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            text = text[:MAX_CHARS]
            if "▁" in text or self._special is None or not text:
                ids = self._tokenize_whole(text)
                if ids.size:
                    out[i] = self._table[ids].mean(axis=0)
                continue
            # the mean of the text's token vectors, from the per-piece sums: a piece's
            # tokens (and so its vectors' sum) do not depend on the text around it
            counts = Counter(_PIECE.findall("▁" + text.replace(" ", "▁")))
            rows = self._piece_row
            missing = [p for p in counts if p not in rows]
            if missing:
                if len(rows) + len(missing) > WORD_CACHE:  # full: forget all, keep this text's
                    rows.clear()
                    missing = list(counts)
                self._add_pieces(missing)
            idx = np.fromiter(map(rows.__getitem__, counts), dtype=np.intp, count=len(counts))
            w = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            total = w @ self._piece_sum[idx] + self._special_sum
            n = float(w @ self._piece_len[idx]) + len(self._special)
            out[i] = total / n
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        normed: npt.NDArray[np.float32] = out / np.maximum(norms, 1e-9)
        return normed

    def _add_pieces(self, pieces: list[str]) -> None:
        """Tokenize new pieces (one batch) and keep each one's token count and vectors' sum;
        `WORD_CACHE` pieces at most (the caller forgets them all when full)."""
        start = len(self._piece_row)
        need = start + len(pieces)
        if need > len(self._piece_len):
            size = min(WORD_CACHE, max(need, 2 * len(self._piece_len)))
            sums = np.zeros((size, EMBED_DIM), dtype=np.float32)
            sums[:start] = self._piece_sum[:start]
            lens = np.zeros(size, dtype=np.float32)
            lens[:start] = self._piece_len[:start]
            self._piece_sum, self._piece_len = sums, lens
        encs = self._tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
        for k, (piece, enc) in enumerate(zip(pieces, encs, strict=True)):
            ids = np.clip(np.asarray(enc.ids, dtype=np.intp), 0, self._vocab - 1)
            self._piece_sum[start + k] = self._table[ids].sum(axis=0)
            self._piece_len[start + k] = len(ids)
            self._piece_row[piece] = start + k

    def token_ids(self, text: str) -> npt.NDArray[np.int64]:
        """The tokenizer's ids for `text`, tokenized piece by piece (what `embed` averages).

        The tokenizer (Llama's BPE without a pre-tokenizer) runs its merges over the whole
        text at once: 0.5 ms for a dev prompt, 1.2-1.5 ms for a 4 kB one under load, most of
        an inline decision. Its normaliser turns each space into "▁" and prepends one, and no
        merge of its vocabulary joins a character to a "▁" after it, so the ids of a text are
        the concatenation of the ids of its pieces, each a run of "▁" and the word after it
        (checked id for id on the 3,150 development prompts and 2,000 random texts, and in
        tests/unit/test_router_features.py). Pieces recur (words), so `embed` tokenizes each
        once and keeps its token count and the sum of its token vectors. A text holding a
        literal "▁" goes through the tokenizer whole."""
        if "▁" in text or self._special is None or not text:
            return self._tokenize_whole(text)
        pieces = _PIECE.findall("▁" + text.replace(" ", "▁"))
        encs = self._tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
        ids = np.fromiter(chain(self._special, chain.from_iterable(e.ids for e in encs)),
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
