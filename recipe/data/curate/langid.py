"""Offline language identification: Unicode script first, then stop-word profiles.

Most languages outside the Latin script are told apart by script alone (Cyrillic,
Greek, Arabic, Hebrew, Devanagari, Thai, Hangul, kana, Han). Latin-script text is
scored against stop-word lists of a handful of languages shipped with the package
(``data/stopwords.json``): the language whose function words make up the largest
share of the words wins, ``und`` (undetermined) when none reaches ``min_share``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np

from recipe.data.curate.text import words

__all__ = ["detect_script", "identify_language", "stopword_profiles"]

# (first code point, last code point, script); anything else that is a letter counts as "other".
_RANGES = [
    (0x0041, 0x005A, "latin"), (0x0061, 0x007A, "latin"), (0x00C0, 0x024F, "latin"), (0x1E00, 0x1EFF, "latin"),
    (0x0370, 0x03FF, "greek"), (0x0400, 0x052F, "cyrillic"), (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0x0900, 0x097F, "devanagari"),
    (0x0E00, 0x0E7F, "thai"), (0x1100, 0x11FF, "hangul"), (0x3040, 0x30FF, "kana"),
    (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"), (0xAC00, 0xD7AF, "hangul"),
]  # fmt: skip
_STARTS = np.array([r[0] for r in _RANGES], dtype=np.uint32)
_ENDS = np.array([r[1] for r in _RANGES], dtype=np.uint32)
_NAMES = [r[2] for r in _RANGES]
_SCRIPT_LANGUAGE = {"greek": "el", "cyrillic": "ru", "hebrew": "he", "arabic": "ar", "devanagari": "hi",
                    "thai": "th", "hangul": "ko", "kana": "ja", "han": "zh"}  # fmt: skip


@lru_cache(maxsize=1)
def stopword_profiles() -> dict[str, frozenset[str]]:
    path = resources.files("recipe.data.curate").joinpath("data").joinpath("stopwords.json")
    data = json.loads(path.read_text("utf-8"))
    return {lang: frozenset(ws) for lang, ws in data.items()}


def detect_script(text: str, max_chars: int = 5000) -> tuple[str, float]:
    """The dominant script of the letters of ``text`` and its share of them."""
    cps = np.frombuffer(text[:max_chars].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    i = np.searchsorted(_STARTS, cps, side="right") - 1
    inside = (i >= 0) & (cps <= _ENDS[np.maximum(i, 0)])
    if not inside.any():
        return "none", 0.0
    names = np.array(_NAMES)[i[inside]]
    values, counts = np.unique(names, return_counts=True)
    top = int(np.argmax(counts))
    # Japanese mixes kana with Han: any real share of kana makes it Japanese.
    if "kana" in values and counts[list(values).index("kana")] >= 0.1 * counts.sum():
        return "kana", float(counts[list(values).index("kana")] / counts.sum())
    return str(values[top]), float(counts[top] / counts.sum())


def identify_language(text: str, min_share: float = 0.05, max_words: int = 400) -> str:
    """An ISO 639-1 code (``en``, ``fr``, ``ru``, ``zh``...) or ``und`` when unsure."""
    script, _ = detect_script(text)
    if script != "latin":
        return _SCRIPT_LANGUAGE.get(script, "und")
    ws = words(text[: max_words * 8])[:max_words]
    if not ws:
        return "und"
    best, best_share = "und", 0.0
    for lang, stop in stopword_profiles().items():
        share = sum(1 for w in ws if w in stop) / len(ws)
        if share > best_share:
            best, best_share = lang, share
    return best if best_share >= min_share else "und"
