"""Synthetic web pages for the curation demo and for training the quality classifier's negatives.

The demo corpus is clean by construction; a crawl is not. ``write_web_corpus`` adds a
small, deterministic "crawl" with every kind of problem the pipeline handles, built
around real English text (the topics of the Python reference documentation that ship
with the standard library in ``pydoc_data``):

* the same URL crawled twice with different dates, near-duplicate copies, exact copies;
* a cookie banner and a navigation line repeated across many pages;
* log dumps, keyword spam, adult spam, random-string gibberish, random-character spam
  (letters, digits and symbols: the math detector takes its digits and operators for formulas);
* pages with e-mail addresses, phone numbers and IP addresses;
* pages from a blocked domain, French/German/Spanish pages;
* broken records: invalid UTF-8, malformed JSON, a missing text field, an empty text.

``low_quality_texts`` generates the negative examples (boilerplate, spam, gibberish).
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Iterator
from pathlib import Path

__all__ = ["gibberish", "low_quality_texts", "random_characters", "reference_texts", "write_web_corpus"]

COOKIE_LINE = "We use cookies to improve your experience. By continuing to browse you accept our cookie policy."
NAV_LINE = "Home | News | Products | About us | Contact | Privacy policy | Terms of use"

_SPAM_PRODUCTS = ["shoes", "watches", "phones", "laptops", "sunglasses", "handbags", "vitamins", "loans", "insurance",
                  "casino bonus", "crypto tokens", "followers", "diet pills", "car parts", "perfume"]  # fmt: skip
_SPAM_TEMPLATES = [
    "Best cheap {p} online! Buy {p} now, discount {p}, {p} sale, {p} deals, free shipping on {p}.",
    "Click here for {p}!!! Top {p} 2024 lowest price guaranteed. {p} {p} {p} order today.",
    "{p} for sale | cheap {p} | buy {p} | {p} near me | best {p} | {p} coupon code",
    "Limited offer: get {p} at 90% off. Don't miss out on {p}. Sign up now and win free {p}!",
]
_BOILERPLATE = [
    "Home | About | Contact | Login | Register | Cart (0) | Checkout",
    "Copyright 2024 All rights reserved. Powered by WordPress. Theme by Example Themes.",
    "Share on Facebook Share on Twitter Share on Pinterest Share by Email",
    "Subscribe to our newsletter to get the latest updates delivered to your inbox.",
    "Previous post Next post Related posts Leave a comment Cancel reply",
    "Skip to content Menu Search Search for: Recent Posts Recent Comments Archives Categories Meta",
]
_MULTILINGUAL = {
    "fr": [
        "La ville est située au bord du fleuve et compte environ deux cent mille habitants.",
        "Son histoire remonte à l'époque romaine, lorsque les marchands y établirent un port.",
        "Au Moyen Âge, la cathédrale fut construite en plusieurs étapes pendant près de deux siècles.",
        "L'économie de la région repose aujourd'hui sur l'agriculture, le tourisme et les services.",
        "Le climat est tempéré, avec des hivers doux et des étés parfois très chauds.",
        "Les habitants sont fiers de leur marché, qui se tient chaque samedi sur la grande place.",
        "Plusieurs écrivains célèbres ont vécu dans cette ville et y ont écrit leurs œuvres.",
        "Le musée des beaux-arts conserve une collection importante de peintures du dix-neuvième siècle.",
        "Une université fondée au quinzième siècle attire encore de nombreux étudiants étrangers.",
        "La gare relie la ville à la capitale en moins de deux heures de train.",
        "Les fêtes traditionnelles rassemblent chaque été des milliers de visiteurs venus de toute la région.",
        "La cuisine locale est réputée pour ses fromages, son pain et ses vins de qualité.",
    ],
    "de": [
        "Die Stadt liegt an einem großen Fluss und hat ungefähr zweihunderttausend Einwohner.",
        "Ihre Geschichte reicht bis in die Römerzeit zurück, als Händler hier einen Hafen gründeten.",
        "Im Mittelalter wurde der Dom in mehreren Abschnitten über fast zwei Jahrhunderte gebaut.",
        "Die Wirtschaft der Region beruht heute vor allem auf Landwirtschaft, Tourismus und Dienstleistungen.",
        "Das Klima ist gemäßigt, mit milden Wintern und manchmal sehr heißen Sommern.",
        "Die Bewohner sind stolz auf ihren Markt, der jeden Samstag auf dem großen Platz stattfindet.",
        "Mehrere berühmte Schriftsteller haben in dieser Stadt gelebt und dort ihre Werke geschrieben.",
        "Das Museum für bildende Kunst besitzt eine bedeutende Sammlung von Gemälden des neunzehnten Jahrhunderts.",
        "Eine im fünfzehnten Jahrhundert gegründete Universität zieht noch immer viele ausländische Studenten an.",
        "Der Bahnhof verbindet die Stadt mit der Hauptstadt in weniger als zwei Stunden.",
        "Die traditionellen Feste ziehen jeden Sommer tausende Besucher aus der ganzen Region an.",
        "Die örtliche Küche ist für ihren Käse, ihr Brot und ihre guten Weine bekannt.",
    ],
    "es": [
        "La ciudad está situada a orillas del río y tiene unos doscientos mil habitantes.",
        "Su historia se remonta a la época romana, cuando los comerciantes establecieron allí un puerto.",
        "En la Edad Media, la catedral se construyó en varias etapas durante casi dos siglos.",
        "La economía de la región se basa hoy en la agricultura, el turismo y los servicios.",
        "El clima es templado, con inviernos suaves y veranos a veces muy calurosos.",
        "Los habitantes están orgullosos de su mercado, que se celebra cada sábado en la plaza mayor.",
        "Varios escritores famosos vivieron en esta ciudad y escribieron allí sus obras.",
        "El museo de bellas artes conserva una importante colección de pinturas del siglo diecinueve.",
        "Una universidad fundada en el siglo quince todavía atrae a muchos estudiantes extranjeros.",
        "La estación conecta la ciudad con la capital en menos de dos horas de tren.",
        "Las fiestas tradicionales reúnen cada verano a miles de visitantes de toda la región.",
        "La cocina local es famosa por sus quesos, su pan y sus vinos de calidad.",
    ],
}
_DIRTY = ["xxx", "porn", "sex", "nude", "camgirls", "milf", "hardcore", "horny", "sexy", "nsfw"]


def reference_texts(limit: int | None = None) -> list[str]:
    """Paragraph groups of the Python reference documentation (``pydoc_data.topics``), sorted by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    out = []
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text.split()) >= 80:
            out.append(text[:6000])
    return out[:limit] if limit is not None else out


def gibberish(rng: random.Random, words: int = 200) -> str:
    """Random lowercase strings: every token an outlier."""
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10))) for _ in range(words))


def random_characters(rng: random.Random, words: int = 200) -> str:
    """Random strings of letters, digits and symbols, in lines of a dozen "words"."""
    alphabet = string.ascii_letters + string.digits * 3 + "+-=*/^()" * 3 + "[]{}<>#$%&@!?;:.,_~|"
    tokens = ["".join(rng.choices(alphabet, k=rng.randint(2, 10))) for _ in range(words)]
    return "\n".join(" ".join(tokens[i : i + 12]) for i in range(0, words, 12))


def _spam(rng: random.Random, sentences: int) -> str:
    return " ".join(rng.choice(_SPAM_TEMPLATES).format(p=rng.choice(_SPAM_PRODUCTS)) for _ in range(sentences))


def _boilerplate(rng: random.Random, lines: int) -> str:
    return "\n".join(rng.choice(_BOILERPLATE) for _ in range(lines))


def _log(rng: random.Random, lines: int) -> str:
    t = rng.randint(0, 10_000)
    out = []
    for i in range(lines):
        out.append(f"2024-03-0{1 + i % 9} 12:{(t + i) % 60:02d}:00 INFO worker-{i % 3} request handled status=200 "
                   f"path=/api/v1/items latency_ms={rng.choice([12, 13, 14])}")  # fmt: skip
    return "\n".join(out)


def low_quality_texts(n: int, seed: int = 1) -> list[str]:
    """``n`` negative examples for the quality classifier: spam, boilerplate, gibberish, logs."""
    rng = random.Random(seed)
    makers = [lambda: _spam(rng, rng.randint(4, 12)), lambda: _boilerplate(rng, rng.randint(4, 12)),
              lambda: gibberish(rng, rng.randint(60, 200)), lambda: _log(rng, rng.randint(10, 30)),
              lambda: _spam(rng, 3) + "\n" + _boilerplate(rng, 4)]  # fmt: skip
    return [makers[i % len(makers)]() for i in range(n)]


def _edit(rng: random.Random, text: str, fraction: float) -> str:
    """Replace about ``fraction`` of the words (a near-duplicate at a chosen distance)."""
    ws = text.split(" ")
    for i in rng.sample(range(len(ws)), max(1, int(len(ws) * fraction))):
        ws[i] = rng.choice(["the", "a", "this", "that", "one", "new"])
    return " ".join(ws)


def _records(seed: int) -> Iterator[dict | str | bytes]:
    rng = random.Random(seed)
    refs = reference_texts(limit=90)
    day = lambda i: f"2023-{1 + i % 12:02d}-{1 + i % 28:02d}"  # noqa: E731
    for i, text in enumerate(refs):
        page = text
        if i % 2 == 0:  # boilerplate around half of the pages, removed by line dedup
            page = f"{NAV_LINE}\n{text}\n{COOKIE_LINE}"
        yield {"text": page, "url": f"https://docs.example.org/reference/{i}", "date": day(i)}
        if i % 9 == 0:  # re-crawled later with an update: only the newer one stays
            yield {"text": page + "\nUpdated: a clarification was added.",
                   "url": f"https://docs.example.org/reference/{i}/", "date": f"2024-{1 + i % 12:02d}-15"}  # fmt: skip
        if i % 9 == 3:  # mirrored with small edits
            yield {"text": _edit(rng, text, 0.03), "url": f"https://mirror.example.net/ref/{i}", "date": day(i)}
        if i % 9 == 6:  # exact copy elsewhere
            yield {"text": page, "url": f"https://copy.example.com/p/{i}", "date": day(i)}
    for i in range(12):
        yield {"text": _log(rng, 40), "url": f"https://logs.example.com/dump/{i}", "date": "2024-02-01"}
        yield {"text": _spam(rng, 14), "url": f"https://deals.example.com/{i}", "date": "2024-02-01"}
        yield {"text": gibberish(rng, 250), "url": f"https://random.example.com/{i}", "date": "2024-02-01"}
    for i in range(6):
        words = [rng.choice(_DIRTY) if j % 4 == 0 else rng.choice(["free", "hot", "video", "live", "best", "chat",
                 "girls", "online", "now", "watch"]) for j in range(120)]  # fmt: skip
        yield {"text": " ".join(words), "url": f"https://adult-videos.example.com/{i}", "date": "2024-02-01"}
        yield {"text": refs[i][:1500], "url": f"https://www.blocked.example/page/{i}", "date": "2024-02-01"}
    for i in range(10):
        contact = (f"For questions write to support{i}@example.org or call +1 (555) 010-{1000 + i}. "
                   f"The mirror at 192.0.2.{10 + i} is updated nightly.")  # fmt: skip
        yield {"text": f"{refs[20 + i][:2500]}\n\n{contact}", "url": f"https://help.example.org/{i}",
               "date": "2024-01-05"}  # fmt: skip
    for lang, sentences in _MULTILINGUAL.items():
        for i in range(8):
            text = " ".join(rng.sample(sentences, 7))
            yield {"text": text, "url": f"https://{lang}.example.org/article/{i}", "date": "2024-01-01"}
    # Random-character spam, from its own generator so that every page above stays the same.
    chars = random.Random(seed + 1)
    for i in range(12):
        yield {"text": random_characters(chars, 250), "url": f"https://random.example.com/chars/{i}",
               "date": "2024-02-01"}  # fmt: skip
    # Broken records, quarantined by the reader.
    yield b'{"text": "caf\xe9 au lait", "url": "https://bad.example.com/latin1"}'
    yield '{"text": "an unterminated record'
    yield json.dumps({"body": "no text field here"})
    yield json.dumps({"text": "   ", "url": "https://bad.example.com/empty"})
    yield json.dumps(["a list, not an object"])


def write_web_corpus(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the synthetic crawl as jsonl (atomically) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for rec in _records(seed):
            if isinstance(rec, bytes):
                f.write(rec + b"\n")
            else:
                f.write((rec if isinstance(rec, str) else json.dumps(rec, ensure_ascii=False)).encode() + b"\n")
    os.replace(tmp, path)
    return path
