"""Stage 3: line dedup as in ccNet - drop lines seen in more than ``max_repeats`` documents per bucket.

Documents are grouped into consecutive buckets of ``bucket_documents`` (30M in the
paper). The fit hashes every normalized line (lowercased, digits to 0, punctuation and
extra spaces removed, as ccNet does) and keeps, per bucket, only the hashes found in
more than ``max_repeats`` documents. The second pass removes every occurrence of those
lines. Cookie banners, navigation and "share this" lines go; a document left with no
text is dropped (``all_lines_duplicated``).

The fit is a fold (``fit_in_parts``): ``fit_part`` gives a run of documents' distinct line
hashes, concatenated, with each document's count of them; ``fit_merge`` cuts the parts at
the bucket boundaries by stream position and counts each bucket as one call of
``Context.map``. Where it runs: under ``executor: ray`` the parts come from the Ray tasks
that hold the documents and each bucket's counting is a Ray task; a local fit hashes here
and counts the buckets one after the other. With several buckets the second pass follows
the stream's order (on the driver); with one (any input under ``bucket_documents``) it is
position-free (``process_anywhere``) and runs in the Ray tasks. Memory while counting: 8
bytes per distinct line per document of a bucket (of the buckets in flight, under Ray),
and the small frequent sets afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import islice

import numpy as np

from recipe.data.curate.record import Doc, text_hash64
from recipe.data.curate.stage import Stage, register
from recipe.errors import ConfigError

__all__ = ["LineDedup", "normalize_line"]

_PUNCT = re.compile(r"[^\w\s]+")
_DIGITS = re.compile(r"\d")
_SPACES = re.compile(r"\s+")


def frequent_hashes(max_repeats: int, hashes: np.ndarray) -> np.ndarray:
    """The values found more than ``max_repeats`` times in ``hashes`` (one bucket's line hashes)."""
    values, counts = np.unique(hashes, return_counts=True)
    return values[counts > max_repeats]


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
    fit_in_parts = True  # the line hashes of a run are computed where the run is; buckets are counted after

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
        # Runs of documents, so that memory holds one bucket's hashes and one run, not the whole input.
        docs = iter(docs)
        self.fit_merge(self.fit_part(run) for run in iter(lambda: list(islice(docs, 4096)), []))

    def fit_part(self, docs: list[Doc]) -> tuple[np.ndarray, np.ndarray]:
        """``(distinct line hashes per document, concatenated (uint64), their count per document (int64))``."""
        # Each distinct line counts once per document: repetition inside one document (a log
        # dump) is the repetition filter's job, and removing it here would hide it from that filter.
        per_doc = [{h for h in self._hashes(doc.text) if h is not None} for doc in docs]
        counts = np.fromiter(map(len, per_doc), dtype=np.int64, count=len(per_doc))
        hashes = np.fromiter((h for s in per_doc for h in s), dtype=np.uint64, count=int(counts.sum()))
        return hashes, counts

    def fit_merge(self, parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        """Cut the parts into buckets by stream position; count each bucket (one ``Context.map`` call)."""
        tasks = map if self.ctx is None else self.ctx.map
        self.frequent = [set(f.tolist()) for f in tasks(partial(frequent_hashes, self.max_repeats),
                                                         self._buckets(parts))]  # fmt: skip
        self.stats.notes["buckets"] = len(self.frequent)
        self.stats.notes["frequent_lines"] = sum(len(f) for f in self.frequent)
        # One bucket: the second pass no longer depends on a document's position, so an executor may
        # run it anywhere (in the Ray tasks, with the frequent set).
        self.process_anywhere = len(self.frequent) == 1

    def _buckets(self, parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
        """The line hashes of each bucket of ``bucket_documents`` documents, in order (one, empty, for no input)."""
        pending: list[np.ndarray] = []
        room = self.bucket_documents  # documents the open bucket still takes
        emitted = False
        for hashes, counts in parts:
            ends = np.cumsum(counts)
            doc0 = 0
            while doc0 < len(counts):
                doc1 = min(len(counts), doc0 + room)
                lo = int(ends[doc0 - 1]) if doc0 else 0
                pending.append(hashes[lo : int(ends[doc1 - 1])])
                room -= doc1 - doc0
                doc0 = doc1
                if room == 0:
                    yield np.concatenate(pending)
                    pending, room, emitted = [], self.bucket_documents, True
        if pending or not emitted:
            yield np.concatenate(pending) if pending else np.zeros(0, np.uint64)

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            frequent = self.frequent[0 if self.process_anywhere else self._pos // self.bucket_documents]
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

    def skip(self, docs: list[Doc]) -> None:
        self._pos += len(docs)

    def finish(self) -> None:
        self.frequent = []
