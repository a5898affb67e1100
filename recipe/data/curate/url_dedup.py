"""Stage 2: URL dedup - keep only the most recent version of each URL.

The first pass builds a table ``hash(normalized url) -> (newest date, position, id)``
(24 bytes of key and value per distinct URL; the URLs themselves are not kept); the
second keeps the document at that position and drops the others as
``url_duplicate``, naming the kept document's id (``duplicate_of``, for the fate log).
Equal dates keep the first one seen, so reruns agree. The table can be built in parts
(``fit_part`` over consecutive runs of documents, ``fit_merge`` in stream order, with the
same rule), which is how ``executor: ray`` builds it in its tasks. Several parts are merged
as a shuffle by URL: each part's table is split by URL hash into ``URL_PARTITIONS``
partitions, each partition is folded (newest date, then first position) as one call of
``Context.map`` (a Ray task under ``executor: ray``), and the folded partitions are joined
into the table on the driver, where the positional second pass runs.

Dates are read by ``read_date`` in these formats only (anything else is unparsed):
- ISO 8601 dates and datetimes, with or without a zone: ``2024-01-01``,
  ``2024-01-01T10:00:00``, ``2024-01-01 10:00:00+02:00``, ``2024-01-01T10:00:00Z``,
  the compact ``20240101`` / ``20240101T100000Z``, and ``2024/01/01`` (read as ``2024-01-01``);
- RFC 2822 (e-mail / HTTP style): ``Mon, 01 Jan 2024 10:00:00 +0000``, ``1 Jan 2024 10:00 GMT``;
- a number (a JSON number, or a string of digits): an integer ``YYYYMMDD`` from
  19900101 to 21001231 that is a real calendar date is that day (so ``"date": 20240101``
  is 2024-01-01, not 1970-08-23); any other number is Unix seconds if it lies from
  1990-01-01 to 2100-01-01 (631152000 .. 4102444800), and is unparsed otherwise
  (milliseconds, 1970-era values, negatives).
A date or datetime without a zone is taken as UTC.

A document whose date is missing or unparsed is kept, undated: it sorts before every
dated version of its URL (so a dated version is kept over it; among undated ones the
first wins). The stage counts such documents (documents with a URL only) in its
counters - ``date_missing``, ``date_unparsed``, and ``date_unparsed:<reason>`` with
``<reason>`` one of ``unknown_format``, ``number_out_of_range``, ``not_a_calendar_date`` -
and keeps a few of the unparsed values in its notes (``date_unparsed_examples``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from recipe.data.curate.record import Doc, text_hash64
from recipe.data.curate.stage import Stage, register

__all__ = ["URL_PARTITIONS", "UrlDedup", "UrlTable", "newest_per_url", "normalize_url", "parse_date", "read_date"]

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


_SECONDS_MIN = 631152000.0  # 1990-01-01T00:00:00Z
_SECONDS_MAX = 4102444800.0  # 2100-01-01T00:00:00Z
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d*)?")
_ISO_SLASH = re.compile(r"\d{4}/\d{1,2}/\d{1,2}")
UNPARSED_EXAMPLES = 5


def read_date(value: object) -> tuple[float | None, str | None]:
    """``(seconds since the epoch UTC, None)`` for a date in an accepted format (see the
    module docstring), else ``(None, reason)``: ``missing``, ``unknown_format``,
    ``number_out_of_range`` or ``not_a_calendar_date``."""
    if value is None or isinstance(value, bool):
        return (None, "missing") if value is None else (None, "unknown_format")
    if isinstance(value, (int, float)):
        return _read_number(float(value))
    text = str(value).strip()
    if not text:
        return None, "missing"
    if _NUMBER.fullmatch(text):
        return _read_number(float(text))
    if _ISO_SLASH.match(text):
        text = text[:10].replace("/", "-") + text[10:]
    if text[-1:] in "Zz" and "T" in text.upper():  # Python 3.10's fromisoformat rejects the Z of a WARC-Date
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        try:
            dt = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None, "unknown_format"
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp(), None


def _read_number(x: float) -> tuple[float | None, str | None]:
    if math.isfinite(x) and x.is_integer() and 19900101 <= x <= 21001231:  # compact ISO YYYYMMDD
        n = int(x)
        try:
            return datetime(n // 10000, n // 100 % 100, n % 100, tzinfo=timezone.utc).timestamp(), None
        except ValueError:
            return None, "not_a_calendar_date"
    if math.isfinite(x) and _SECONDS_MIN <= x < _SECONDS_MAX:
        return x, None
    return None, "number_out_of_range"


def parse_date(value: object) -> float | None:
    """Seconds since the epoch (UTC) of a date in an accepted format; None if missing or unparsed."""
    return read_date(value)[0]


URL_PARTITIONS = 16  # the shuffle's partitions: independent folds, one task each
# Per URL hash, in stream order: (url hashes uint64, dates float64, positions int64, kept ids uint64).
UrlTable = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def newest_per_url(table: UrlTable) -> UrlTable:
    """One row per URL hash: the newest date, and among equal dates the first position."""
    h, ts, pos, kept = table
    order = np.lexsort((pos, -ts, h))  # by URL, newest first, then earliest
    first = np.ones(order.size, dtype=bool)
    first[1:] = h[order[1:]] != h[order[:-1]]
    pick = order[first]
    return h[pick], ts[pick], pos[pick], kept[pick]


@register
class UrlDedup(Stage):
    """Keep the newest document of each URL; drop the rest as ``url_duplicate``."""

    name = "url_dedup"
    needs_fit = True
    fit_in_parts = True  # the newest version per URL folds run by run

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.best: dict[int, tuple[float, int, int]] = {}
        self._pos = 0

    def _key(self, doc: Doc) -> tuple[int, float, str | None] | None:
        if not doc.url:
            return None
        ts, why = read_date(doc.date)
        return text_hash64(normalize_url(doc.url)), (-math.inf if ts is None else ts), why

    def fit(self, docs: Iterator[Doc]) -> None:
        self.fit_merge([self.fit_part(docs)])

    def fit_part(self, docs: Iterable[Doc]) -> tuple[int, UrlTable, dict[str, int], list[str]]:
        """``(documents, table of (url hash, newest date, position, id), date counters, unparsed examples)``
        of a run."""
        best: dict[int, tuple[float, int, int]] = {}
        counters: dict[str, int] = {}
        examples: list[str] = []
        n = 0
        for n, doc in enumerate(docs, 1):
            key = self._key(doc)
            if key is None:
                continue
            h, ts, why = key
            for counter in (() if why is None else ("date_missing",) if why == "missing" else
                            ("date_unparsed", f"date_unparsed:{why}")):  # fmt: skip
                counters[counter] = counters.get(counter, 0) + 1
            if why not in (None, "missing") and len(examples) < UNPARSED_EXAMPLES:  # kept, undated
                examples.append(f"{doc.source}: {str(doc.date)[:80]!r} ({why})")
            old = best.get(h)
            if old is None or ts > old[0]:  # equal dates: the first one seen stays
                best[h] = (ts, n - 1, text_hash64(doc.source))
        values = list(best.values())
        table = (np.fromiter(best, np.uint64, len(best)), np.fromiter((v[0] for v in values), np.float64, len(best)),
                 np.fromiter((v[1] for v in values), np.int64, len(best)),
                 np.fromiter((v[2] for v in values), np.uint64, len(best)))  # fmt: skip
        return n, table, counters, examples

    def fit_merge(self, parts: Iterable[tuple[int, UrlTable, dict[str, int], list[str]]]) -> None:
        """Shuffle the parts' tables by URL hash, fold each partition (one ``Context.map`` call), join."""
        examples: list[str] = []
        partitions: list[list[UrlTable]] = [[] for _ in range(URL_PARTITIONS)]
        offset = 0
        for n, (h, ts, pos, kept), counters, part_examples in parts:
            where = (h % np.uint64(URL_PARTITIONS)).astype(np.intp)
            order = np.argsort(where, kind="stable")
            bounds = np.searchsorted(where[order], np.arange(URL_PARTITIONS + 1))
            for p in range(URL_PARTITIONS):
                rows = order[bounds[p] : bounds[p + 1]]
                if rows.size:
                    partitions[p].append((h[rows], ts[rows], pos[rows] + offset, kept[rows]))
            offset += n
            for counter, c in counters.items():
                self.count(counter, c)
            examples += part_examples[: UNPARSED_EXAMPLES - len(examples)]
        tables = ([np.concatenate(column) for column in zip(*tables)] for tables in partitions if tables)
        tasks = map if self.ctx is None else self.ctx.map
        self.best = {}
        for h, ts, pos, kept in tasks(newest_per_url, tables):
            self.best.update(zip(h.tolist(), zip(ts.tolist(), pos.tolist(), kept.tolist())))
        self.stats.notes["distinct_urls"] = len(self.best)
        if examples:
            self.stats.notes["date_unparsed_examples"] = examples

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            pos, self._pos = self._pos, self._pos + 1
            key = self._key(doc)
            if key is None:
                self.count("without_url")
                continue
            ts, keep_pos, kept_id = self.best[key[0]]
            if keep_pos != pos:
                when = "undated" if ts == -math.inf else datetime.fromtimestamp(ts, timezone.utc).date().isoformat()
                self.drop(doc, "url_duplicate", f"a version dated {when} is kept", duplicate_of=f"{kept_id:016x}")

    def skip(self, docs: list[Doc]) -> None:
        self._pos += len(docs)

    def finish(self) -> None:
        self.best = {}
