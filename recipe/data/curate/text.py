"""Vectorized word and n-gram hashing shared by the dedup, filter and classifier stages.

Words are runs of letters, digits and ``_`` of the lowercased text (any non-ASCII
letter counts; common Unicode punctuation is a separator). A whole batch of
documents is hashed in one go with numpy: the UTF-8 bytes of all documents are
joined, word boundaries come from a byte table, and each word's 64-bit hash is a
polynomial hash read off a prefix sum (``uint64`` arithmetic wraps, i.e. works
modulo 2**64, and the base is odd so it has an inverse). No Python loop runs per
word, and the hashes are the same in every process and every run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["WORD_RE", "WordBatch", "hash_words", "mix64", "ngram_hashes", "words"]

WORD_RE = re.compile(r"\w+")
_U64 = np.uint64
_BASE = _U64(0x100000001B3)  # FNV prime: odd, so invertible modulo 2**64
_BASE_INV = _U64(pow(0x100000001B3, -1, 1 << 64))
# Multipliers of the positions in an n-gram (odd, distinct): makes the n-gram hash order-sensitive.
_NGRAM_MULT = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD,
     0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9, 0x2545F4914F6CDD1D, 0x9FB21C651E98DF25],
    dtype=np.uint64,
)  # fmt: skip

# Byte classes: ASCII letters/digits/underscore and every byte of a multi-byte UTF-8 character.
_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[128:] = True
# Unicode punctuation and spaces that would otherwise glue words together (they are multi-byte).
_SEPARATORS = {
    cp: " "
    for cp in [*range(0x2000, 0x2070), *range(0x3000, 0x3040), *range(0xFF01, 0xFF10), *range(0xFF1A, 0xFF21),
               0x00A0, 0x00A1, 0x00AB, 0x00B7, 0x00BB, 0x00BF, 0x00D7, 0x00F7, 0xFEFF]
}  # fmt: skip

_pow_cache: dict[str, np.ndarray] = {"pow": np.ones(1, _U64), "inv": np.ones(1, _U64)}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and BASE**-i (mod 2**64) for i < n, grown by doubling and cached."""
    have = _pow_cache["pow"]
    if have.size < n:
        size = max(n, 2 * have.size)
        with np.errstate(over="ignore"):
            _pow_cache["pow"] = np.cumprod(np.concatenate([[_U64(1)], np.full(size - 1, _BASE)]), dtype=_U64)
            _pow_cache["inv"] = np.cumprod(np.concatenate([[_U64(1)], np.full(size - 1, _BASE_INV)]), dtype=_U64)
    return _pow_cache["pow"][:n], _pow_cache["inv"][:n]


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over all 64 output bits."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U64(30))
        x = x * _U64(0xBF58476D1CE4E5B9)
        x ^= x >> _U64(27)
        x *= _U64(0x94D049BB133111EB)
        x ^= x >> _U64(31)
    return x


class WordBatch:
    """Word hashes of a batch of texts: ``hashes[offsets[i]:offsets[i+1]]`` are text i's words.

    ``lengths`` holds each word's length in UTF-8 bytes (the character count for ASCII).
    """

    __slots__ = ("hashes", "lengths", "offsets")

    def __init__(self, hashes: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> None:
        self.hashes, self.lengths, self.offsets = hashes, lengths, offsets

    def __len__(self) -> int:
        return self.offsets.size - 1

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.hashes[a:b], self.lengths[a:b]

    def doc_ids(self) -> np.ndarray:
        """The text index of every word."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.offsets))


def hash_words(texts: Sequence[str]) -> WordBatch:
    """Hash the words of every text in ``texts`` (lowercased) in one vectorized pass."""
    parts = [t.lower().translate(_SEPARATORS).encode("utf-8", "surrogatepass") for t in texts]
    # A newline between texts: a non-word byte, so no word spans two texts.
    buf = np.frombuffer(b"\n".join(parts) + b"\n", dtype=np.uint8)
    text_starts = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) + 1 for p in parts], out=text_starts[1:])
    is_word = _WORD_BYTE[buf]
    edges = np.diff(is_word.astype(np.int8), prepend=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)  # exclusive; the trailing newline closes the last word
    if starts.size == 0:
        return WordBatch(np.zeros(0, _U64), np.zeros(0, np.int64), np.zeros(len(parts) + 1, np.int64))
    pw, inv = _powers(buf.size + 1)
    with np.errstate(over="ignore"):
        values = (buf.astype(_U64) + _U64(1)) * pw[: buf.size]
        prefix = np.concatenate([[_U64(0)], np.cumsum(values, dtype=_U64)])
        raw = (prefix[ends] - prefix[starts]) * inv[starts]  # sum_k byte_k * BASE**k over the word
        hashes = mix64(raw ^ ((ends - starts).astype(_U64) << _U64(56)))
    offsets = np.searchsorted(starts, text_starts, side="left").astype(np.int64)
    return WordBatch(hashes, (ends - starts).astype(np.int64), offsets)


def ngram_hashes(batch: WordBatch, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word n-gram that lies inside one text, and the text index of each.

    A text with fewer than ``n`` words contributes one n-gram made of all its words,
    so short texts still get a (non-empty) shingle set.
    """
    if not 1 <= n <= _NGRAM_MULT.size:
        raise ValueError(f"n-gram size must be in [1, {_NGRAM_MULT.size}], got {n}")
    h, counts = batch.hashes, np.diff(batch.offsets)
    total = h.size
    doc_of = batch.doc_ids()
    m = max(total - n + 1, 0)
    with np.errstate(over="ignore"):
        acc = np.zeros(m, _U64)
        for k in range(n):
            acc += h[k : k + m] * _NGRAM_MULT[k]
        keep = doc_of[:m] == doc_of[n - 1 : n - 1 + m] if m else np.zeros(0, bool)
        grams, owners = mix64(acc[keep]), doc_of[:m][keep]
        short = np.flatnonzero((counts > 0) & (counts < n))
        if short.size:  # one shingle of all the words of each short text
            extra = np.zeros(short.size, _U64)
            for j, d in enumerate(short):
                w = h[batch.offsets[d] : batch.offsets[d + 1]]
                extra[j] = (w * _NGRAM_MULT[: w.size]).sum(dtype=_U64)
            grams = np.concatenate([grams, mix64(extra)])
            owners = np.concatenate([owners, short])
            order = np.argsort(owners, kind="stable")
            grams, owners = grams[order], owners[order]
    return grams, owners


def words(text: str) -> list[str]:
    """The lowercased words of ``text`` as strings (same tokenization as ``hash_words``, for Python-side use)."""
    return WORD_RE.findall(text.lower().translate(_SEPARATORS))
