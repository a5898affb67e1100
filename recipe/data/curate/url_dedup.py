"""Stage 2: URL dedup - keep only the most recent version of each URL.

The first pass builds a table ``hash(normalized url) -> (newest date, position)``
(16 bytes of key and value per distinct URL; the URLs themselves are not kept); the
second keeps the document at that position and drops the others as
``url_duplicate``. Equal dates keep the first one seen, so reruns agree. A missing
or unreadable date sorts before every real date (and is counted).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timezone
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from recipe.data.curate.record import Doc, text_hash64
from recipe.data.curate.stage import Stage, register

__all__ = ["UrlDedup", "normalize_url", "parse_date"]

_DEFAULT_PORTS = {"http": "80", "https": "443"}
_TRACKING = ("utm_", "fbclid", "gclid", "mc_cid", "mc_eid")


def normalize_url(url: str) -> str:
    """One spelling per page: lowercase scheme/host, no default port, fragment, tracking
    parameters or trailing slash; query parameters sorted."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url.strip()
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower().removeprefix("www.")
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None or _DEFAULT_PORTS.get(scheme) == str(port) else f"{host}:{port}"
    query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.startswith(_TRACKING))
    path = parts.path.rstrip("/") or "/"
    return urlunsplit((scheme, netloc, path, urlencode(query), ""))


def parse_date(value: str | None) -> float | None:
    """Seconds since the epoch (UTC) of an ISO-8601 date/datetime or a number; None if unreadable."""
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    try:
        return float(text)  # already a timestamp
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("/", "-"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


@register
class UrlDedup(Stage):
    """Keep the newest document of each URL; drop the rest as ``url_duplicate``."""

    name = "url_dedup"
    needs_fit = True

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.best: dict[int, tuple[float, int]] = {}
        self._pos = 0

    def _key(self, doc: Doc) -> tuple[int, float] | None:
        if not doc.url:
            return None
        ts = parse_date(doc.date)
        return text_hash64(normalize_url(doc.url)), (-math.inf if ts is None else ts)

    def fit(self, docs: Iterator[Doc]) -> None:
        for pos, doc in enumerate(docs):
            key = self._key(doc)
            if key is None:
                continue
            h, ts = key
            if ts == -math.inf:
                self.count("unreadable_or_missing_date")
            old = self.best.get(h)
            if old is None or ts > old[0]:
                self.best[h] = (ts, pos)
        self.stats.notes["distinct_urls"] = len(self.best)

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            pos, self._pos = self._pos, self._pos + 1
            key = self._key(doc)
            if key is None:
                self.count("without_url")
                continue
            ts, keep_pos = self.best[key[0]]
            if keep_pos != pos:
                when = "undated" if ts == -math.inf else datetime.fromtimestamp(ts, timezone.utc).date().isoformat()
                self.drop(doc, "url_duplicate", f"a version dated {when} is kept")

    def finish(self) -> None:
        self.best = {}
