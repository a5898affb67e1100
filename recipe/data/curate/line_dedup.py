"""Stage 3: line dedup as in ccNet - drop lines seen in more than ``max_repeats`` documents per bucket.

Documents are grouped into consecutive buckets of ``bucket_documents`` (30M in the
paper). The first pass hashes every normalized line (lowercased, digits to 0,
punctuation and extra spaces removed, as ccNet does) and keeps, per bucket, only the
hashes found in more than ``max_repeats`` documents: memory is 8 bytes per line of one
bucket while counting, and the small frequent set afterwards. The second pass
removes every occurrence of those lines. Cookie banners, navigation and
"share this" lines go; a document left with no text is dropped
(``all_lines_duplicated``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from recipe.data.curate.record import Doc, text_hash64
from recipe.data.curate.stage import Stage, register
from recipe.errors import ConfigError

__all__ = ["LineDedup", "normalize_line"]

_PUNCT = re.compile(r"[^\w\s]+")
_DIGITS = re.compile(r"\d")
_SPACES = re.compile(r"\s+")


def normalize_line(line: str, digits: bool = True) -> str:
    """ccNet's line normalization: lowercase, digits to 0, no punctuation, single spaces."""
    line = line.lower()
    if digits:
        line = _DIGITS.sub("0", line)
    return _SPACES.sub(" ", _PUNCT.sub(" ", line)).strip()


@register
class LineDedup(Stage):
    """Remove lines repeated more than ``max_repeats`` times within each bucket of documents.

    Args:
        max_repeats: a line seen more often than this in one bucket is removed everywhere in it.
        bucket_documents: documents per bucket (30,000,000 in the paper).
        normalize_digits: count "page 1" and "page 2" as the same line (ccNet does).
        min_chars: lines shorter than this (normalized) are never removed (0, as in ccNet; a
            corpus of plays repeats its speaker names, "Exeunt." and "ACT 1." legitimately).
    """

    name = "line_dedup"
    needs_fit = True

    def __init__(self, max_repeats: int = 6, bucket_documents: int = 30_000_000, normalize_digits: bool = True,
                 min_chars: int = 0, **kw) -> None:  # fmt: skip
        super().__init__(**kw)
        if max_repeats < 1 or bucket_documents < 1:
            raise ConfigError(f"line_dedup: max_repeats and bucket_documents must be >= 1, got "
                              f"{max_repeats} and {bucket_documents}")  # fmt: skip
        self.max_repeats, self.bucket_documents, self.digits = max_repeats, bucket_documents, normalize_digits
        self.min_chars = min_chars
        self.frequent: list[set[int]] = []
        self._pos = 0

    def _hashes(self, text: str) -> list[int | None]:
        out: list[int | None] = []
        for line in text.split("\n"):
            norm = normalize_line(line, self.digits) if line.strip() else ""
            out.append(text_hash64(norm) if norm and len(norm) >= self.min_chars else None)
        return out

    def fit(self, docs: Iterator[Doc]) -> None:
        pending: list[np.ndarray] = []
        for pos, doc in enumerate(docs):
            if pos and pos % self.bucket_documents == 0:
                self._close_bucket(pending)
                pending = []
            # Each distinct line counts once per document: repetition inside one document (a log
            # dump) is the repetition filter's job, and removing it here would hide it from that filter.
            pending.append(np.fromiter({h for h in self._hashes(doc.text) if h is not None}, dtype=np.uint64))
        self._close_bucket(pending)
        self.stats.notes["buckets"] = len(self.frequent)
        self.stats.notes["frequent_lines"] = sum(len(f) for f in self.frequent)

    def _close_bucket(self, parts: list[np.ndarray]) -> None:
        hashes = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        values, counts = np.unique(hashes, return_counts=True)
        self.frequent.append(set(values[counts > self.max_repeats].tolist()))

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            frequent = self.frequent[self._pos // self.bucket_documents]
            self._pos += 1
            lines = doc.text.split("\n")
            hashes = self._hashes(doc.text)
            keep = [line for line, h in zip(lines, hashes) if h is None or h not in frequent]
            removed = len(lines) - len(keep)
            if not removed:
                continue
            self.count("lines_removed", removed)
            self.count("documents_changed")
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(keep)).strip("\n")
            if not text.strip():
                self.drop(doc, "all_lines_duplicated", f"{removed} repeated lines")
            else:
                doc.text = text

    def finish(self) -> None:
        self.frequent = []
