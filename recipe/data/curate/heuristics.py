"""Stage 5 (part): heuristic quality filters - repetition (Gopher), basics, dirty words, random characters.

``Repetition`` implements the Gopher repetition rules (Rae et al. 2021, appendix A,
table A1) that the Llama 3 paper uses against repeated content such as logs and
boilerplate, with Gopher's definitions: words are the whitespace-separated tokens of
the text as written (no lowercasing, punctuation stays on its word, so "value," and
"value" differ), and every character fraction is over all the characters of the text.

* duplicated lines are at most 30% of the non-blank lines and 20% of the characters;
* duplicated paragraphs (split on blank lines) likewise 30% and 20%;
* the most frequent word 2/3/4-gram (its length times its count) covers at most
  20/18/16% of the characters;
* the repeated occurrences of word 5..10-grams cover at most 15..10% of the characters.

A "duplicated" line, paragraph or n-gram is a repeat of an earlier one: the first
occurrence is original text and is not counted. Repeated n-grams that overlap
(a run of repeated text is covered by many overlapping 5-grams) count each word once.
The n-gram statistics use integer word ids and one ``np.unique`` per n and document.

``char_class_dependence`` measures whether a text's characters follow any pattern at
all; ``TokenKL`` (kl_filter.py) uses it to drop random-character pages in every bucket.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np

from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Stage, register
from recipe.data.curate.text import words
from recipe.data.errors import DataError
from recipe.errors import ConfigError

__all__ = ["BasicFilter", "DirtyWords", "Repetition", "char_class_dependence", "gopher_words", "load_word_list",
           "line_stats", "repeated_block_stats", "repetition_stats"]

TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """One uint64 key per word n-gram of ``ids`` (word ids below 2**32).

    Up to two words the key is the exact pair; longer n-grams chain a xorshift-multiply
    mix, where two different n-grams share a key with probability about m**2 / 2**64
    for m n-grams: too rare to move a fraction.
    """
    m = ids.size - n + 1
    x = ids.astype(np.uint64)
    acc = x[:m].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            if n <= 2:
                acc = (acc << np.uint64(32)) | x[k : k + m]
            else:
                acc = (acc ^ (acc >> np.uint64(29))) * _GOLDEN + x[k : k + m] + np.uint64(1)
    return acc


def gopher_words(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Whitespace-separated words of ``text`` as integer ids (equal words, equal ids) and lengths."""
    vocab: dict[str, int] = {}
    ws = text.split()
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in ws), dtype=np.int64, count=len(ws))
    lengths = np.fromiter((len(w) for w in ws), dtype=np.int64, count=len(ws))
    return ids, lengths


def repetition_stats(text: str, tops: dict[int, float] = TOP_NGRAM_MAX, dups: dict[int, float] = DUP_NGRAM_MAX,
                     ids: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, float]:  # fmt: skip
    """Gopher's word n-gram fractions of ``text``: ``top_<n>gram`` and ``dup_<n>gram`` for each n asked.

    An n-gram's characters are its words joined by single spaces (as Gopher counts
    them); the denominator is ``len(text)``.
    """
    if ids is None or lengths is None:
        ids, lengths = gopher_words(text)
    out: dict[str, float] = {}
    total = float(len(text))
    if total == 0 or ids.size == 0:
        return out
    # Characters of the n-gram starting at word i: its words plus the n - 1 spaces between them.
    cum = np.concatenate([[0], np.cumsum(lengths)])
    for n in sorted(tops):
        if ids.size < n:
            continue
        _, first, counts = np.unique(_ngram_keys(ids, n), return_index=True, return_counts=True)
        best = counts.max()
        if best < 2:  # nothing repeats: no top n-gram to speak of
            out[f"top_{n}gram"] = 0.0
            continue
        # Ties go to the n-gram that occurs first in the text (the order Counter.most_common keeps).
        i = int(first[counts == best].min())
        out[f"top_{n}gram"] = float(best * (cum[i + n] - cum[i] + n - 1) / total)
    for n in sorted(dups):
        if ids.size < n:
            continue
        m = ids.size - n + 1
        _, first, inverse = np.unique(_ngram_keys(ids, n), return_index=True, return_inverse=True)
        repeats = np.flatnonzero(first[inverse.reshape(-1)] != np.arange(m))  # later occurrences only
        if repeats.size == 0:
            out[f"dup_{n}gram"] = 0.0
            continue
        # Mark every word inside a repeated occurrence once, however many repeats overlap it.
        edges = np.zeros(ids.size + 1, np.int64)
        np.add.at(edges, repeats, 1)
        np.add.at(edges, repeats + n, -1)
        covered = np.cumsum(edges[:-1]) > 0
        # A run of k covered words is k words and the k - 1 spaces between them.
        chars = int(lengths[covered].sum()) + int(np.count_nonzero(covered[1:] & covered[:-1]))
        out[f"dup_{n}gram"] = float(chars / total)
    return out


def repeated_block_stats(blocks: list[str], total_chars: int) -> tuple[float, float]:
    """Share of ``blocks`` (lines or paragraphs) that repeat an earlier one, and their share of the characters."""
    if not blocks or total_chars <= 0:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = 0
    for block in blocks:
        if block in seen:
            dup += 1
            dup_chars += len(block)
        else:
            seen.add(block)
    return dup / len(blocks), dup_chars / total_chars


def line_stats(text: str) -> dict[str, float]:
    """Gopher's duplicate line and paragraph fractions (``dup_lines``, ``dup_line_chars``, ``dup_paragraphs``...).

    Blank lines are separators, not lines: counting them would make every document
    with paragraph breaks look repetitive. Lines and paragraphs are compared with their
    surrounding whitespace stripped.
    """
    total = len(text)
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text)]
    paragraphs = [p for p in paragraphs if p]
    if not lines:
        return {}
    dup_lines, dup_line_chars = repeated_block_stats(lines, total)
    dup_paras, dup_para_chars = repeated_block_stats(paragraphs, total)
    return {"dup_lines": dup_lines, "dup_line_chars": dup_line_chars, "dup_paragraphs": dup_paras,
            "dup_paragraph_chars": dup_para_chars}  # fmt: skip


@register
class Repetition(Stage):
    """Drop documents over Gopher's repetition thresholds (reasons ``dup_lines``, ``top_2gram``, ``dup_5gram``...).

    The rules are checked in Gopher's order - lines, paragraphs, top n-grams, duplicated
    n-grams - and the first one broken names the reason.

    Args:
        top_ngram: {n: max fraction of characters in the most frequent n-gram}.
        dup_ngram: {n: max fraction of characters in repeated n-grams}.
        max_dup_lines, max_dup_line_chars: duplicated lines (share of lines / characters); null turns off.
        max_dup_paragraphs, max_dup_paragraph_chars: the same for paragraphs; null turns off.
        min_words: documents with fewer words are not judged (the fractions are noise there).
    """

    name = "repetition"

    def __init__(self, top_ngram: dict | None = None, dup_ngram: dict | None = None, max_dup_lines: float | None = 0.3,
                 max_dup_line_chars: float | None = 0.2, max_dup_paragraphs: float | None = 0.3,
                 max_dup_paragraph_chars: float | None = 0.2, min_words: int = 20, **kw) -> None:  # fmt: skip
        super().__init__(**kw)
        self.tops = {int(k): float(v) for k, v in (TOP_NGRAM_MAX if top_ngram is None else top_ngram).items()}
        self.dups = {int(k): float(v) for k, v in (DUP_NGRAM_MAX if dup_ngram is None else dup_ngram).items()}
        if any(not 1 <= n <= 10 for n in [*self.tops, *self.dups]):
            raise ConfigError("repetition: n-gram sizes must be between 1 and 10")
        self.min_words = min_words
        self.limits: dict[str, float] = {}
        for key, limit in (("dup_lines", max_dup_lines), ("dup_line_chars", max_dup_line_chars),
                           ("dup_paragraphs", max_dup_paragraphs), ("dup_paragraph_chars", max_dup_paragraph_chars)):
            if limit is not None:
                self.limits[key] = float(limit)
        self.limits |= {f"top_{n}gram": v for n, v in sorted(self.tops.items())}
        self.limits |= {f"dup_{n}gram": v for n, v in sorted(self.dups.items())}  # fmt: skip

    def stats_of(self, text: str) -> dict[str, float]:
        """Every fraction the rules look at (empty for documents under ``min_words``)."""
        ids, lengths = gopher_words(text)
        if ids.size < self.min_words:
            return {}
        return line_stats(text) | repetition_stats(text, self.tops, self.dups, ids, lengths)

    def reason(self, text: str) -> tuple[str, str] | None:
        """The first rule ``text`` breaks, as ``(reason, detail)``; None when it passes."""
        stats = self.stats_of(text)
        for key, limit in self.limits.items():
            if stats.get(key, 0.0) > limit:
                return key, f"{key} {stats[key]:.3f} > {limit}"
        return None

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            found = self.reason(doc.text)
            if found is not None:
                self.drop(doc, *found)


# Character classes of ASCII: 0 space, 1 lowercase vowel (and y), 2 lowercase consonant, 3 uppercase,
# 4 digit, 5 punctuation and symbols; every non-ASCII character is class 6.
_CHAR_CLASS = np.full(128, 5, np.int64)
for _chars, _cls in ((" \t\n\r\f\v", 0), ("aeiouy", 1), ("bcdfghjklmnpqrstvwxz", 2),
                     ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 3), ("0123456789", 4)):  # fmt: skip
    _CHAR_CLASS[[ord(c) for c in _chars]] = _cls
_N_CLASSES = 7


def char_class_dependence(text: str, min_chars: int = 200, max_chars: int = 20_000,
                          min_ascii: float = 0.5) -> float | None:  # fmt: skip
    """How much a character's class (space, vowel, consonant, capital, digit, symbol) depends on the previous one's.

    The mutual information between the classes of neighbouring characters, as a share
    of the class entropy: 0 when each character is drawn independently of the last
    (random strings, whatever their alphabet), and well above 0 for anything written by
    people or programs: words alternate vowels and consonants, spaces follow words,
    digits come in numbers, code and LaTeX follow their syntax. Measured on real text
    it is 0.09-0.5 (prose 0.1+, stdlib and C code 0.11+, minified JavaScript 0.09,
    LaTeX 0.13+, worked arithmetic 0.3); random letters, alphanumerics, printable
    ASCII, hex and base64 score under 0.04.

    None (not judged) for texts under ``min_chars`` characters, where the estimate is
    noise, and for texts less than ``min_ascii`` ASCII: the classes describe
    Latin-script text, and other scripts are all one class here.
    """
    head = text[:max_chars]
    if len(head) < min_chars:
        return None
    cp = np.frombuffer(head.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    ascii_ = cp < 128
    if ascii_.mean() < min_ascii:
        return None
    cls = np.where(ascii_, _CHAR_CLASS[np.minimum(cp, 127)], _N_CLASSES - 1)
    joint = np.bincount(cls[:-1] * _N_CLASSES + cls[1:], minlength=_N_CLASSES**2).reshape(_N_CLASSES, _N_CLASSES)
    joint = joint / joint.sum()
    prev, nxt = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mutual = float(np.sum(joint[nz] * np.log2(joint[nz] / np.outer(prev, nxt)[nz])))
    p = nxt[nxt > 0]
    entropy = float(-np.sum(p * np.log2(p)))
    return mutual / entropy if entropy > 0 else None


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
