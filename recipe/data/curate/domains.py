"""Stage 8: domain and knowledge classification - route documents to buckets, down-sample.

Each document gets a ``bucket`` (general, math, code, multilingual by default), a
``language`` and, for general text, a ``topic``:

* a record's own ``domain`` field wins when it names a bucket (after ``aliases``, e.g.
  ``prose -> general``); an unknown value is counted and the document is classified;
* otherwise: code if enough lines look like code, multilingual if the language
  (fastText's lid.176, ``langid.py``) is not one of ``languages`` and not ``und``, math
  if enough lines hold arithmetic or math vocabulary, general else;
* topics come from keyword profiles (``data/topics.json`` or ``topics_file``).

``keep_rates`` / ``topic_keep_rates`` down-sample over-represented buckets and topics:
a document is kept when a hash of its text falls below the rate, so the choice is
deterministic and independent of the order (``bucket_downsample``,
``topic_downsample``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from recipe.data.curate.detect import code_score, math_score
from recipe.data.curate.langid import identify_language, model_languages
from recipe.data.curate.record import Doc, hash01
from recipe.data.curate.stage import Stage, register
from recipe.data.curate.text import words
from recipe.data.errors import DataError
from recipe.errors import ConfigError

__all__ = ["DEFAULT_ALIASES", "DEFAULT_BUCKETS", "DomainClassifier", "load_topics"]

DEFAULT_BUCKETS = ("general", "math", "code", "multilingual")
DEFAULT_ALIASES = {"prose": "general", "web": "general", "text": "general", "wiki": "general", "books": "general",
                   "encyclopedia": "general", "reasoning": "math", "stem": "math", "github": "code",
                   "source": "code"}  # fmt: skip
_SAMPLE_SALT = b"domain-downsample"


def load_topics(path: str | None) -> dict[str, frozenset[str]]:
    """Topic -> keywords from a JSON file ({topic: [words]}); None: the packaged profiles."""
    try:
        if path is None:
            raw = resources.files("recipe.data.curate").joinpath("data").joinpath("topics.json").read_text("utf-8")
        else:
            raw = Path(path).read_text(encoding="utf-8")
        data = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"cannot read topics file {path} ({type(e).__name__}); give a JSON {{topic: [words]}}"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(f"topics file {path}: expected a JSON object {{topic: [words]}}")
    return {str(k): frozenset(str(w).lower() for w in v) for k, v in data.items()}


@register
class DomainClassifier(Stage):
    """Assign bucket, language and topic; down-sample by ``keep_rates`` / ``topic_keep_rates``.

    Args:
        buckets: the bucket names (the mix weights refer to them).
        aliases: record ``domain`` value -> bucket (merged over the defaults).
        languages: languages that are not "multilingual" (default ["en"]).
        code_threshold, math_threshold: share of code-like / math-like lines.
        keep_rates: {bucket: share kept} (default 1 for all).
        topic_keep_rates: {topic: share kept} for general documents.
        topics_file: a JSON {topic: [keywords]} (default: the packaged profiles).
        min_topic_hits: keyword hits a topic needs (else "other").
    """

    name = "domains"

    def __init__(self, buckets: list[str] | None = None, aliases: dict[str, str] | None = None,
                 languages: list[str] | None = None, code_threshold: float = 0.35, math_threshold: float = 0.3,
                 keep_rates: dict[str, float] | None = None, topic_keep_rates: dict[str, float] | None = None,
                 topics_file: str | None = None, min_topic_hits: int = 3, **kw) -> None:  # fmt: skip
        super().__init__(**kw)
        self.bucket_names = list(buckets or DEFAULT_BUCKETS)
        missing = {"general"} - set(self.bucket_names)
        if missing:
            raise ConfigError("domains: buckets must include 'general' (where unclassified text goes)")
        self.aliases = {**DEFAULT_ALIASES, **{k.lower(): v for k, v in (aliases or {}).items()}}
        self.languages = set(languages or ["en"])
        self.code_threshold, self.math_threshold = code_threshold, math_threshold
        self.keep_rates = dict(keep_rates or {})
        self.topic_keep_rates = dict(topic_keep_rates or {})
        for name, rates in (("keep_rates", self.keep_rates), ("topic_keep_rates", self.topic_keep_rates)):
            bad = {k: v for k, v in rates.items() if not 0.0 <= float(v) <= 1.0}
            if bad:
                raise ConfigError(f"domains: {name} must be in [0, 1], got {bad}")
        unknown = set(self.keep_rates) - set(self.bucket_names)
        if unknown:
            raise ConfigError(
                f"domains: keep_rates names unknown bucket(s) {sorted(unknown)}; buckets: {self.bucket_names}"
            )
        self.topics = load_topics(topics_file)
        self.min_topic_hits = min_topic_hits

    def setup(self, ctx) -> None:
        super().setup(ctx)
        # Load the language-ID model now: a broken install fails before any data is read.
        self.stats.notes["language_id"] = f"fastText lid.176 ({len(model_languages())} languages)"

    def classify(self, doc: Doc) -> str:
        doc.language = identify_language(doc.text)
        if doc.domain:
            value = doc.domain.strip().lower()
            bucket = self.aliases.get(value, value)
            if bucket in self.bucket_names:
                return bucket
            self.count("unknown_record_domain")
        if "code" in self.bucket_names and code_score(doc.text) >= self.code_threshold:
            return "code"
        if "multilingual" in self.bucket_names and doc.language not in self.languages and doc.language != "und":
            return "multilingual"
        if "math" in self.bucket_names and math_score(doc.text) >= self.math_threshold:
            return "math"
        return "general"

    def topic(self, text: str) -> str:
        ws = words(text[:20_000])
        best, hits = "other", 0
        for topic, keys in sorted(self.topics.items()):
            n = sum(1 for w in ws if w in keys)
            if n > hits:
                best, hits = topic, n
        return best if hits >= self.min_topic_hits else "other"

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            doc.bucket = self.classify(doc)
            self.count(f"bucket:{doc.bucket}")
            self.count(f"language:{doc.language}")
            rate = float(self.keep_rates.get(doc.bucket, 1.0))
            if doc.bucket == "general":
                doc.topic = self.topic(doc.text)
                self.count(f"topic:{doc.topic}")
            if rate < 1.0 and hash01(doc.text, _SAMPLE_SALT) >= rate:
                self.drop(doc, "bucket_downsample", f"{doc.bucket} keep rate {rate}")
                continue
            topic_rate = float(self.topic_keep_rates.get(doc.topic or "", 1.0))
            if topic_rate < 1.0 and hash01(doc.text, _SAMPLE_SALT + b"topic") >= topic_rate:
                self.drop(doc, "topic_downsample", f"{doc.topic} keep rate {topic_rate}")
