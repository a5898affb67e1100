"""Cheap content detectors: does a text look like source code, or like math?

Both look at lines, not words: code and worked math are line-structured, and a
line-level vote is robust to a prose paragraph inside a code file (a docstring) or
a sentence inside a solution.
"""

from __future__ import annotations

import re

__all__ = ["code_score", "looks_like_code", "math_score"]

_CODE_LINE = re.compile(
    r"^\s*(?:def |class |import |from \S+ import|return\b|if .*:$|elif |else:|for .* in .*:$|while .*:$|try:|except\b"
    r"|with .*:$|raise |yield |@\w|#include|#define|function\b|var |let |const |public |private |static |package "
    r"|fn |func |\}|\{)"
    r"|[;{}]\s*$|^\s*(?://|/\*|\*/)|\)\s*:\s*$|^\s*\w+(?:\.\w+)*\s*(?:[+\-*/]?=)\s*\S.*$"
    r"|\bself\.|^\s*\w+(?:\.\w+)*\(.*\)\s*$|^\s*(?:\"\"\"|\'\'\')|^\s*[\])]|^\s*(?:[\w.]+\s*,\s*)+$|^\s*[>]{3} "
    r"|^\s*['\"][^'\"]*['\"]\s*[:,]|\b0x[0-9a-fA-F]{2,}\b"
)
_MATH_LINE = re.compile(
    r"\d\s*[+x*/×÷=^]\s*\(?-?\d|\d\s+-\s+\(?-?\d|\\(?:frac|sqrt|sum|int|cdot|times|alpha|beta|theta|pi)\b|\$[^$\n]+\$"
    r"|\b(?:solve|equation|theorem|lemma|proof|compute|simplify|answer|solution|denominator|numerator|quotient"
    r"|remainder|integer|polynomial|derivative|integral)\b",
    re.I,
)


def _lines(text: str, max_lines: int) -> list[str]:
    return [line for line in text.split("\n", max_lines)[:max_lines] if line.strip()]


def code_score(text: str, max_lines: int = 400) -> float:
    """Share of non-blank lines (of the first ``max_lines``) that look like code."""
    lines = _lines(text, max_lines)
    if not lines:
        return 0.0
    return sum(1 for line in lines if _CODE_LINE.search(line)) / len(lines)


def looks_like_code(text: str, threshold: float = 0.35) -> bool:
    return code_score(text) >= threshold


def math_score(text: str, max_lines: int = 400) -> float:
    """Share of non-blank lines (of the first ``max_lines``) with arithmetic, formulas or math vocabulary."""
    lines = _lines(text, max_lines)
    if not lines:
        return 0.0
    return sum(1 for line in lines if _MATH_LINE.search(line)) / len(lines)
