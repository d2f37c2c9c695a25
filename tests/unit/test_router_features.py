"""Prompt features: the word-by-word tokenization gives the tokenizer's own ids, so the
embedding a decision computes is WordLlama's, only faster (docs/routing.md, "Decision latency")."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fleetplane.router.features import MAX_CHARS, WordLlamaEmbedder

TEXTS = [
    "", " ", "   ", "hello world", "a  b", " x", "  lead", "trail  ", "x▁y",
    "def f(x):\n    return x  # ok\n\tdone", "naïve café 東京 😀 ünïcødé",
    "Which of these do scientists offer as the most recent explanation?\nA) disease\nB) dust",
    "for i in range(10):\n        if i %  2:\n            print( i )   \n",
    "Order 1234 for Alice: 3 x $19.99 -- ship   to 221B Baker St.",
]


@pytest.fixture(scope="module")
def embedder() -> WordLlamaEmbedder:
    return WordLlamaEmbedder()  # reads the wheel's files; no network here or in CI


def whole(e: WordLlamaEmbedder, text: str) -> list[int]:
    return [int(i) for i in e._tokenize_whole(text)]


def test_word_by_word_ids_are_the_tokenizers_ids(embedder: WordLlamaEmbedder) -> None:
    rng = random.Random(7)
    alphabet = [*"ab cd  \n\t{}()x1é東😀_-.,:;'\"", "  ", "    ", "the ", "return "]
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
                     for _ in range(300)]
    for text in texts:
        assert [int(i) for i in embedder.token_ids(text)] == whole(embedder, text), repr(text)
    # the embedding (from the pieces' cached sums, the second time from the cache too) is
    # the mean of those ids' vectors
    for text in texts[:40] + TEXTS:
        ids = embedder._tokenize_whole(text)
        expected = embedder._table[ids].mean(axis=0) if ids.size else np.zeros(256)
        expected = expected / max(float(np.linalg.norm(expected)), 1e-9)
        assert np.allclose(embedder.embed([text])[0], expected, atol=1e-5), repr(text)


def test_a_full_word_cache_starts_over_and_the_embedding_stays_right(
        embedder: WordLlamaEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetplane.router import features

    monkeypatch.setattr(features, "WORD_CACHE", 12)
    fresh = WordLlamaEmbedder()
    texts = ["one two three four five six", "six seven eight nine ten eleven twelve",
             "one two thirteen fourteen", "alpha beta gamma delta epsilon zeta eta theta"]
    for text in texts * 2:
        ids = fresh._tokenize_whole(text)
        expected = embedder._table[ids].mean(axis=0)
        expected /= np.linalg.norm(expected)
        assert np.allclose(fresh.embed([text])[0], expected, atol=1e-5), text
        assert len(fresh._piece_row) <= 12


def test_the_embedding_is_the_mean_of_the_tokenizers_token_vectors(
        embedder: WordLlamaEmbedder) -> None:
    text = ("Refactor the parser so that errors carry line numbers " * 200)[:MAX_CHARS + 50]
    ids = embedder._tokenize_whole(text[:MAX_CHARS])
    expected = embedder._table[ids].mean(axis=0)
    expected /= np.linalg.norm(expected)
    got = embedder.embed([text])[0]
    assert np.allclose(got, expected, atol=1e-5)
    assert not np.allclose(embedder.embed(["Translate the release notes into French"])[0], got)
