"""What ``recipe data build`` and the curation's pack stage share: the tokenizer they take,
and the train/val split by a hash of each document's text.
"""

from __future__ import annotations

import heapq
import os
from typing import Protocol

import numpy as np

from recipe.data.shards import ShardWriter

__all__ = ["Splitter", "TokenizerLike", "load_tokenizer"]


class TokenizerLike(Protocol):
    n_words: int
    bos_id: int
    eos_id: int

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]: ...


def load_tokenizer(tokenizer: TokenizerLike | str | os.PathLike | None) -> TokenizerLike:
    """A ready tokenizer: an object is used as is, a path or None loads ``recipe.tokenizer.Tokenizer``."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from recipe.tokenizer import Tokenizer  # the real Llama 3 tokenizer by default

        return Tokenizer(tokenizer)
    return tokenizer


class Splitter:
    """Route documents to train/val from the text hash, independent of order.

    ``val_fraction`` mode: val iff hash < fraction; if that picks no document at all,
    the one with the smallest hash goes to val (so val is never empty with >= 2
    documents). ``val_documents=k`` mode: the k smallest hashes (at most kept - 1).
    Both hold back the current candidates (1 or k documents) in memory; a candidate
    that loses goes to train then, so those few documents move later in train order.
    """

    def __init__(self, train: ShardWriter, val: ShardWriter, fraction: float, k: int | None) -> None:
        self.train, self.val, self.fraction, self.k = train, val, fraction, k
        self.held: list[tuple[float, int, np.ndarray, str | None]] = []  # max-heap via negated hash
        self.count = 0
        self.val_direct = 0

    def add(self, h: float, tokens: np.ndarray, domain: str | None = None) -> None:
        self.count += 1
        if self.k is None and h < self.fraction:
            self.val.add(tokens, domain)
            self.val_direct += 1
            return
        capacity = self.k if self.k is not None else (1 if self.val_direct == 0 else 0)
        item = (-h, self.count, tokens, domain)
        if capacity == 0:
            self._flush_held_to_train()
            self.train.add(tokens, domain)
        elif len(self.held) < capacity:
            heapq.heappush(self.held, item)
        else:
            out = heapq.heappushpop(self.held, item)  # the largest hash leaves the candidates
            self.train.add(out[2], out[3])

    def _flush_held_to_train(self) -> None:
        for item in sorted(self.held, key=lambda x: x[1]):
            self.train.add(item[2], item[3])
        self.held = []

    def finish(self) -> None:
        held = sorted(self.held, key=lambda x: -x[0])  # smallest hash first
        if self.k is None:
            to_val = held if self.val_direct == 0 and self.count >= 2 else []
        else:
            to_val = held[: max(0, min(self.k, self.count - 1))]
        for item in sorted(to_val, key=lambda x: x[1]):
            self.val.add(item[2], item[3])
        for item in sorted(held[len(to_val) :], key=lambda x: x[1]):
            self.train.add(item[2], item[3])
        self.held = []
