"""Filters that keep good text: Gopher repetition rules, HTML detection, random-character pages.

Each rule is checked on real text that must be kept (the Python reference documentation
in ``pydoc_data``, standard-library source, LaTeX-heavy docstrings, real HTML pages made
by the standard library) and on junk that must go. The fixtures in ``tests/data/curate``
are docstrings of installed packages, frozen so the tests do not depend on their versions
(see ``tests/data/curate/README.md``).
"""

from __future__ import annotations

import base64
import calendar
import difflib
import hashlib
import pydoc
import random
import re
import string
import sysconfig
import textwrap
from pathlib import Path

import pytest

from recipe.data.curate.clean import Clean, looks_like_html
from recipe.data.curate.domains import DomainClassifier
from recipe.data.curate.heuristics import Repetition, char_class_dependence, line_stats, repetition_stats
from recipe.data.curate.kl_filter import TokenKL
from recipe.data.curate.record import Doc
from recipe.data.curate.synthetic import _MULTILINGUAL, _boilerplate, _log, gibberish, random_characters
from recipe.data.curate.synthetic import reference_texts
from recipe.data.demo import iter_math_documents

DATA = Path(__file__).parent / "data" / "curate"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
LATEX = ("sympy_lerchphi.txt", "sympy_meijerg.txt", "sympy_bernoulli.txt")
HTML_PROSE = ("pygments_html_formatter.txt", "jinja2_groupby.txt", "markupsafe_markup.txt")
CODE_MODULES = ("textwrap.py", "fnmatch.py", "bisect.py", "colorsys.py", "heapq.py", "difflib.py", "calendar.py",
                "ipaddress.py", "encodings/cp1252.py", "encodings/idna.py")  # fmt: skip


def fixture(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def docs_pages() -> list[str]:
    """Pages of the Python reference documentation: ordinary, clean package documentation."""
    pages = reference_texts()
    # pydoc_data ships with CPython; without it there is no real documentation to test on.
    assert len(pages) >= 50, "pydoc_data (the standard library's reference topics) is missing from this Python"
    return pages


# ------------------------------------------------------------------------------ Gopher repetition


def reference_ngram_stats(text: str, n: int) -> tuple[float, float]:
    """(top n-gram, duplicated n-gram) character fractions, written straight from the paper's definition.

    Words are split on whitespace. The top n-gram is the most frequent one (the first to
    occur among equals), counted as its length times its count. Duplicated n-grams: each
    word inside a repeat (not the first occurrence) of some n-gram is marked once; the
    marked words and the single spaces between neighbouring marked words are counted.
    """
    ws = text.split()
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    counts: dict[tuple[str, ...], int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    best = max(counts.values())
    top = next(g for g in grams if counts[g] == best)
    top_frac = best * len(" ".join(top)) / len(text) if best > 1 else 0.0
    seen: set[tuple[str, ...]] = set()
    marked = [False] * len(ws)
    for i, g in enumerate(grams):
        if g in seen:
            marked[i : i + n] = [True] * n
        seen.add(g)
    chars = sum(len(w) for w, m in zip(ws, marked) if m)
    chars += sum(1 for a, b in zip(marked, marked[1:]) if a and b)
    return top_frac, chars / len(text)


def test_ngram_fractions_match_the_definition_on_real_pages(docs_pages):
    for text in docs_pages:
        stats = repetition_stats(text)
        for n in (2, 3, 4, 5, 6, 7, 8, 9, 10):
            top, dup = reference_ngram_stats(text, n)
            if n <= 4:
                assert stats[f"top_{n}gram"] == pytest.approx(top, abs=1e-12), (n, text[:60])
            else:
                assert stats[f"dup_{n}gram"] == pytest.approx(dup, abs=1e-12), (n, text[:60])


def test_package_documentation_passes(docs_pages):
    # Counting n-grams over lowercased, punctuation-split words dropped 16 of these 69 pages
    # (13 of them for dup_5gram): "x", "y" and "," repeat in every expression, so that is not
    # repetition. With Gopher's whitespace words 65 pass; the rest are operator tables and a
    # page that repeats "which must be integers or one of them must be a custom object".
    rep = Repetition()
    failed = [(rep.reason(t), t[:40]) for t in docs_pages if rep.reason(t) is not None]
    assert len(failed) <= 0.08 * len(docs_pages), failed


def test_words_keep_their_case_and_punctuation(docs_pages):
    # The same real page scored on lowercased words with punctuation split off (the old
    # tokenization) crosses the 5-gram threshold; on whitespace words it is far below it.
    page = next(t for t in docs_pages if t.startswith("Binary arithmetic operations"))
    folded = " ".join(re.findall(r"\w+", page.lower()))
    assert reference_ngram_stats(folded, 5)[1] > 0.15
    assert repetition_stats(page)["dup_5gram"] < 0.15
    assert Repetition().reason(page) is None


def test_first_occurrence_is_original_and_overlaps_count_once(docs_pages):
    # A page with no repeated 5-gram of its own: all repetition below comes from the copies.
    page = next(t for t in docs_pages if repetition_stats(t)["dup_5gram"] == 0.0)
    words_chars = len(" ".join(page.split()))  # a copy's characters as Gopher counts them
    twice = f"{page}\n\n{page}"
    stats = repetition_stats(twice)
    # Only the second copy is duplicated: about half the text, not all of it.
    assert stats["dup_5gram"] == pytest.approx(words_chars / len(twice), abs=1e-12)
    assert 0.45 < stats["dup_10gram"] < 0.55
    thrice = f"{page}\n\n{page}\n\n{page}"
    # Copies 2 and 3 are one run of repeated words: every word once, plus the space joining the runs.
    assert repetition_stats(thrice)["dup_5gram"] == pytest.approx((2 * words_chars + 1) / len(thrice), abs=1e-12)
    lines = line_stats(twice)
    assert lines["dup_paragraphs"] == pytest.approx(0.5)
    assert lines["dup_paragraph_chars"] == pytest.approx(len(page.strip()) / len(twice), rel=0.01)
    assert lines["dup_lines"] > 0.45
    assert Repetition().reason(twice)[0] == "dup_lines"  # Gopher's order: lines first


def test_paragraph_rule(docs_pages):
    page = docs_pages[1]
    twice = f"{page}\n\n{page}"
    rep = Repetition(max_dup_lines=None, max_dup_line_chars=None)
    assert rep.reason(twice)[0] == "dup_paragraphs"
    assert Repetition(max_dup_lines=None, max_dup_line_chars=None, max_dup_paragraphs=None).reason(twice)[0] == (
        "dup_paragraph_chars"
    )


def test_top_ngram_is_length_times_count():
    line = "ERROR worker could not connect to the database, retrying"
    text = "\n".join(f"2024-03-0{1 + i % 9} 12:00:{i % 60:02d} {line}" for i in range(40))
    stats = repetition_stats(text)
    # Every n-gram of the message occurs 40 times; the first of them is the top one.
    assert stats["top_2gram"] == pytest.approx(40 * len("ERROR worker") / len(text))
    assert stats["top_3gram"] == pytest.approx(40 * len("ERROR worker could") / len(text))
    assert Repetition().reason(text)[0] == "top_3gram"


def test_repetitive_junk_is_dropped():
    rep = Repetition()
    rng = random.Random(5)
    logs = [_log(rng, 40) for _ in range(10)]
    boilerplate = [_boilerplate(rng, 20) for _ in range(10)]
    assert all(rep.reason(t) is not None for t in logs + boilerplate)


def test_short_documents_are_not_judged():
    assert Repetition().reason("yes yes yes yes yes") is None  # 5 words < 20: not judged


# ------------------------------------------------------------------------------ HTML detection


def real_html_pages() -> dict[str, str]:
    """HTML written by the standard library: whole pages and fragments."""
    old = (STDLIB / "bisect.py").read_text(encoding="utf-8").splitlines()
    new = [line.replace("lo", "low") for line in old]
    return {
        "pydoc page": pydoc.html.page("textwrap", pydoc.html.document(textwrap, "textwrap")),
        "pydoc fragment": pydoc.html.document(textwrap, "textwrap"),
        "difflib page": difflib.HtmlDiff().make_file(old, new),
        "difflib table": difflib.HtmlDiff().make_table(old, new),
        "calendar page": calendar.HTMLCalendar().formatyearpage(2024).decode("utf-8"),
        "calendar month": calendar.HTMLCalendar().formatmonth(2024, 1),
    }


@pytest.mark.parametrize("name", sorted(real_html_pages()))
def test_real_html_pages_are_detected_and_extracted(name):
    page = real_html_pages()[name]
    assert looks_like_html(page)
    clean = Clean()
    doc = Doc(text=page, source=name)
    clean.process([doc])
    assert clean.stats.counters["html_extracted"] == 1
    assert "<td" not in doc.text and "</" not in doc.text and doc.text.strip()


@pytest.mark.parametrize("name", HTML_PROSE)
def test_prose_about_html_is_text(name):
    text = fixture(name)
    # These pages quote several tags (the rule that looked for two of them fired on each) ...
    assert sum(text.count(tag) for tag in ("<div", "<pre", "<ul>", "<li>", "<span", "<td", "<em>", "<strong>")) >= 2
    assert not looks_like_html(text)
    clean, text_only = Clean(), Clean(html=False)
    doc, plain = Doc(text=text, source=name), Doc(text=text, source=name)
    clean.process([doc])
    text_only.process([plain])
    # ... and come out whole, cleaned as text (the HTML extractor turned the 10,552-character
    # formatter page into 812 characters).
    assert "html_extracted" not in clean.stats.counters
    assert doc.text == plain.text and len(doc.text) > 0.95 * len(text)


def test_reference_documentation_is_not_html(docs_pages):
    assert not any(looks_like_html(t) for t in docs_pages)


def test_a_page_after_an_xml_declaration_and_comment():
    page = real_html_pages()["pydoc page"]
    assert looks_like_html('<?xml version="1.0"?>\n<!-- saved from the web -->\n' + page)
    assert looks_like_html("\ufeff" + page)


# ------------------------------------------------------------------------------ random characters


def stdlib_code() -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in CODE_MODULES]


def junk_pages(seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    alnum = string.ascii_letters + string.digits
    return {
        "random characters": [random_characters(rng, 250) for _ in range(5)],
        "random letters": [gibberish(rng, 200) for _ in range(5)],
        "random alphanumerics": [" ".join("".join(rng.choices(alnum, k=rng.randint(4, 14))) for _ in range(150))
                                 for _ in range(5)],  # fmt: skip
        "hex digests": ["\n".join(hashlib.sha256(f"{i}-{j}".encode()).hexdigest() for j in range(30))
                        for i in range(3)],  # fmt: skip
        "base64 blobs": [base64.encodebytes(rng.randbytes(1500)).decode() for _ in range(3)],
    }


def test_real_text_code_and_math_have_dependent_characters(docs_pages):
    limit = TokenKL().min_char_dependence
    real = {
        "documentation": docs_pages,
        "stdlib code": stdlib_code(),
        "LaTeX docstrings": [fixture(name) for name in LATEX],
        "worked arithmetic": [r["text"] for r in iter_math_documents(200, seed=3)],
        "French, German, Spanish": [" ".join(sentences) for sentences in _MULTILINGUAL.values()],
        "prose about HTML": [fixture(name) for name in HTML_PROSE],
    }
    for kind, texts in real.items():
        scores = [char_class_dependence(t) for t in texts]
        judged = [s for s in scores if s is not None]
        assert judged, kind
        assert min(judged) > limit * 1.3, (kind, min(judged))  # a margin, not a near miss


def test_random_character_pages_have_independent_characters():
    limit = TokenKL().min_char_dependence
    for kind, texts in junk_pages().items():
        scores = [char_class_dependence(t) for t in texts]
        assert all(s is not None and s < limit for s in scores), (kind, scores)


def test_short_and_non_latin_texts_are_not_judged():
    assert char_class_dependence("x7#Lq 9f&j") is None  # too short to measure
    rng = random.Random(1)
    cyrillic = " ".join("".join(rng.choices("абвгдежзиклмнопрстуфхцчшщыэюя", k=6)) for _ in range(80))
    assert char_class_dependence(cyrillic) is None  # the classes describe Latin-script text only


@pytest.mark.parametrize("bucket", ["math", "code", "general"])
def test_token_kl_drops_random_character_pages_in_every_bucket(bucket):
    rng = random.Random(7)
    junk = [random_characters(rng, 250) for _ in range(8)]
    if bucket == "math":
        # The routing that let them through: their digits and "+"/"=" look like formulas.
        classifier = DomainClassifier()
        junk = [t for t in junk if classifier.classify(Doc(text=t, source="j")) == "math"]
        assert len(junk) >= 6
        real = [r["text"] for r in iter_math_documents(400, seed=1)]
    elif bucket == "code":
        real = stdlib_code()
    else:
        real = reference_texts()
    docs = [Doc(text=t, source=f"real:{i}", bucket=bucket) for i, t in enumerate(real)]
    docs += [Doc(text=t, source=f"junk:{i}", bucket=bucket) for i, t in enumerate(junk)]

    words_only = TokenKL(max_kl=6.0, min_words=50, min_char_dependence=None)
    words_only.fit(iter(docs))
    words_only.process(docs)
    if bucket == "math":
        # Their words split into letters and digits, common in math: KL alone lets them through.
        assert not any(d.drop_reason for d in docs if d.source.startswith("junk"))
    for d in docs:
        d.drop_reason = d.drop_detail = None

    stage = TokenKL(max_kl=6.0, min_words=50)
    stage.fit(iter(docs))
    stage.process(docs)
    assert [d.drop_reason for d in docs if d.source.startswith("junk")] == ["random_chars"] * len(junk)
    assert not [d.source for d in docs if d.source.startswith("real") and d.drop_reason == "random_chars"]
    assert stage.stats.dropped["random_chars"]["documents"] == len(junk)  # counted with its reason
