"""Stage 5 (part): heuristic quality filters - repetition (Gopher), basics, dirty words.

``Repetition`` implements the Gopher rules (Rae et al. 2021, table A1) that the
Llama 3 paper uses against repeated content such as logs and boilerplate:

* the most frequent word 2/3/4-gram covers at most 20/18/16% of the characters;
* the words inside duplicated 5..10-grams cover at most 15..10% of the characters;
* duplicated lines are at most 30% of the lines and 20% of the characters.

The n-gram statistics are computed on word hashes (``recipe.data.curate.text``), one
``np.unique`` per n and document, with no Python loop per word.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Stage, register
from recipe.data.curate.text import hash_words, words
from recipe.data.errors import DataError
from recipe.errors import ConfigError

__all__ = ["BasicFilter", "DirtyWords", "Repetition", "load_word_list", "repetition_stats"]

TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def _ngrams(h: np.ndarray, n: int) -> np.ndarray:
    m = h.size - n + 1
    acc = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc = acc * np.uint64(0x100000001B3) + h[k : k + m]
    return acc


def repetition_stats(h: np.ndarray, lengths: np.ndarray, tops=TOP_NGRAM_MAX, dups=DUP_NGRAM_MAX) -> dict[str, float]:
    """Gopher's n-gram fractions of one document from its word hashes and word lengths."""
    out: dict[str, float] = {}
    total = float(lengths.sum())
    if total == 0:
        return out
    cum = np.concatenate([[0], np.cumsum(lengths)])
    for n in tops:
        if h.size < n:
            continue
        g = _ngrams(h, n)
        values, first, counts = np.unique(g, return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] > 1:
            i = int(first[top])
            out[f"top_{n}gram"] = float(counts[top] * (cum[i + n] - cum[i]) / total)
        else:
            out[f"top_{n}gram"] = 0.0
    for n in dups:
        if h.size < n:
            continue
        g = _ngrams(h, n)
        _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
        starts = np.flatnonzero(counts[inverse] > 1)
        if starts.size == 0:
            out[f"dup_{n}gram"] = 0.0
            continue
        cover = np.zeros(h.size + 1, np.int32)  # words inside any duplicated n-gram, overlaps counted once
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        covered = np.cumsum(cover[:-1]) > 0
        out[f"dup_{n}gram"] = float(lengths[covered].sum() / total)
    return out


def line_stats(text: str) -> dict[str, float]:
    """Share of lines (and of their characters) that repeat an earlier line of the document."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return {}
    seen: set[str] = set()
    dup = dup_chars = 0
    for line in lines:
        if line in seen:
            dup += 1
            dup_chars += len(line)
        seen.add(line)
    chars = sum(len(line) for line in lines)
    return {"dup_lines": dup / len(lines), "dup_line_chars": dup_chars / max(chars, 1)}


@register
class Repetition(Stage):
    """Drop documents over Gopher's repetition thresholds (reasons ``top_2gram``, ``dup_5gram``, ``dup_lines``...).

    Args:
        top_ngram: {n: max fraction of characters in the most frequent n-gram}.
        dup_ngram: {n: max fraction of characters in duplicated n-grams}.
        max_dup_lines, max_dup_line_chars: duplicated lines (share of lines / characters); null turns off.
        min_words: documents with fewer words are not judged (the fractions are noise there).
    """

    name = "repetition"

    def __init__(self, top_ngram: dict | None = None, dup_ngram: dict | None = None, max_dup_lines: float | None = 0.3,
                 max_dup_line_chars: float | None = 0.2, min_words: int = 20, **kw) -> None:  # fmt: skip
        super().__init__(**kw)
        self.tops = {int(k): float(v) for k, v in (TOP_NGRAM_MAX if top_ngram is None else top_ngram).items()}
        self.dups = {int(k): float(v) for k, v in (DUP_NGRAM_MAX if dup_ngram is None else dup_ngram).items()}
        if any(not 1 <= n <= 10 for n in [*self.tops, *self.dups]):
            raise ConfigError("repetition: n-gram sizes must be between 1 and 10")
        self.min_words = min_words
        self.limits = {f"top_{n}gram": v for n, v in self.tops.items()}
        self.limits |= {f"dup_{n}gram": v for n, v in self.dups.items()}
        if max_dup_lines is not None:
            self.limits["dup_lines"] = max_dup_lines
        if max_dup_line_chars is not None:
            self.limits["dup_line_chars"] = max_dup_line_chars

    def reason(
        self, text: str, h: np.ndarray | None = None, lengths: np.ndarray | None = None
    ) -> tuple[str, str] | None:
        """The first rule ``text`` breaks, as ``(reason, detail)``; None when it passes."""
        if h is None or lengths is None:
            h, lengths = hash_words([text]).doc(0)
        if h.size < self.min_words:
            return None
        stats = repetition_stats(h, lengths, self.tops, self.dups) | line_stats(text)
        for key, limit in self.limits.items():
            if stats.get(key, 0.0) > limit:
                return key, f"{key} {stats[key]:.3f} > {limit}"
        return None

    def process(self, docs: list[Doc]) -> None:
        batch = hash_words([d.text for d in docs])
        for i, doc in enumerate(docs):
            found = self.reason(doc.text, *batch.doc(i))
            if found is not None:
                self.drop(doc, *found)


def load_word_list(path: str | Path | None, default: str) -> set[str]:
    """Lowercased words of a list file (one per line, ``#`` comments); ``None``: the packaged ``default``."""
    if path is None:
        text = resources.files("recipe.data.curate").joinpath("data").joinpath(default).read_text(encoding="utf-8")
        where = f"recipe/data/curate/data/{default}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read word list {path} ({type(e).__name__}); fix the path in the config") from None
        where = str(path)
    items = {line.split("#", 1)[0].strip().lower() for line in text.splitlines()}
    items.discard("")
    if not items:
        raise DataError(f"word list {where} is empty; put one entry per line")
    return items


@register
class DirtyWords(Stage):
    """Drop documents with many words from a block list (``dirty_words``): adult content, slurs.

    Args:
        words_file: one word per line (default: the small list shipped in the package).
        min_count: at least this many hits ...
        min_ratio: ... making up at least this share of the words.
    """

    name = "dirty_words"

    def __init__(self, words_file: str | None = None, min_count: int = 3, min_ratio: float = 0.01, **kw) -> None:
        super().__init__(**kw)
        self.words = load_word_list(words_file, "dirty_words.txt")
        self.min_count, self.min_ratio = min_count, min_ratio

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            ws = words(doc.text)
            hits = sum(1 for w in ws if w in self.words)
            if hits and ws and hits >= self.min_count and hits / len(ws) >= self.min_ratio:
                self.drop(doc, "dirty_words", f"{hits} of {len(ws)} words")


@register
class BasicFilter(Stage):
    """Length, symbol and line-shape basics of the Gopher rules (reasons named after the rule).

    Args:
        min_words, max_words: document length in words.
        min_mean_word_length, max_mean_word_length: characters per word.
        max_symbol_ratio: ``#`` and ``...`` per word.
        max_bullet_lines: share of lines starting with a bullet.
        max_ellipsis_lines: share of lines ending with ``...``.
        min_alpha_words: share of words with a letter.
    """

    name = "basic_filter"

    def __init__(self, min_words: int = 50, max_words: int = 100_000, min_mean_word_length: float = 3.0,
                 max_mean_word_length: float = 10.0, max_symbol_ratio: float = 0.1, max_bullet_lines: float = 0.9,
                 max_ellipsis_lines: float = 0.3, min_alpha_words: float = 0.8, **kw) -> None:  # fmt: skip
        super().__init__(**kw)
        self.min_words, self.max_words = min_words, max_words
        self.min_mwl, self.max_mwl = min_mean_word_length, max_mean_word_length
        self.max_symbol_ratio, self.max_bullet_lines = max_symbol_ratio, max_bullet_lines
        self.max_ellipsis_lines, self.min_alpha_words = max_ellipsis_lines, min_alpha_words

    def reason(self, text: str) -> tuple[str, str] | None:
        raw = text.split()
        n = len(raw)
        if n < self.min_words:
            return "too_few_words", f"{n} words < {self.min_words}"
        if n > self.max_words:
            return "too_many_words", f"{n} words > {self.max_words}"
        ws = words(text)
        mean = sum(map(len, ws)) / max(len(ws), 1)
        if not self.min_mwl <= mean <= self.max_mwl:
            return "mean_word_length", f"{mean:.1f} characters per word"
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / n > self.max_symbol_ratio:
            return "symbol_ratio", f"{symbols} symbols per {n} words"
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if lines:
            bullets = sum(1 for line in lines if line[0] in "-*\u2022\u2023\u25e6")
            if bullets / len(lines) > self.max_bullet_lines:
                return "bullet_lines", f"{bullets} of {len(lines)} lines"
            ellipsis = sum(1 for line in lines if line.endswith(("...", "\u2026")))
            if ellipsis / len(lines) > self.max_ellipsis_lines:
                return "ellipsis_lines", f"{ellipsis} of {len(lines)} lines"
        alpha = sum(1 for w in raw if any(c.isalpha() for c in w))
        if alpha / n < self.min_alpha_words:
            return "alpha_words", f"{alpha} of {n} words have a letter"
        return None

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            found = self.reason(doc.text)
            if found is not None:
                self.drop(doc, *found)
