"""Read raw documents leniently: every bad record is quarantined with a reason, never a crash.

``recipe.data.corpus`` stops at the first bad line, which is right for a build of a
trusted corpus; a web crawl has bad lines by the thousand. Here each record is either
a ``Doc`` or a ``Quarantined`` with one of: ``invalid_utf8``, ``malformed_json``,
``not_an_object``, ``missing_text``, ``text_not_string``, ``empty``, ``too_large``.
Problems with a whole input (missing path, unreadable parquet, no text column) stay
``DataError``: no document of that input can be read, so the run should stop.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.data.corpus import META_FIELDS, list_inputs
from recipe.data.curate.record import Doc
from recipe.data.errors import DataError

__all__ = ["Quarantined", "read_records"]

EXCERPT_CHARS = 500


@dataclass(frozen=True)
class Quarantined:
    """A record that could not become a document."""

    source: str
    reason: str
    detail: str
    excerpt: str
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "reason": self.reason, "detail": self.detail, "excerpt": self.excerpt}


def read_records(
    paths: str | os.PathLike | list[str | os.PathLike], text_field: str = "text", max_chars: int = 1_000_000
) -> Iterator[Doc | Quarantined]:
    """Every record of every input, in a deterministic order, as a ``Doc`` or a ``Quarantined``."""
    roots = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    for root in map(Path, roots):
        for item, kind in list_inputs(root):
            label = item.name if item == root else item.relative_to(root).as_posix()
            if kind == "jsonl":
                yield from _jsonl(item, label, text_field, max_chars)
            elif kind == "text":
                yield _text_file(item, label, max_chars)
            else:
                yield from _columns(item, kind, label, text_field, max_chars)


def _meta(record: dict[str, Any]) -> dict[str, str | None]:
    return {k: (None if record.get(k) is None else str(record[k])) for k in META_FIELDS}


def _check(text: Any, source: str, raw_len: int, text_field: str, max_chars: int, meta: dict) -> Doc | Quarantined:
    if text is None:
        return Quarantined(source, "empty", f"field {text_field!r} is null", "", raw_len)
    if not isinstance(text, str):
        return Quarantined(source, "text_not_string", f"field {text_field!r} is a {type(text).__name__}",
                           repr(text)[:EXCERPT_CHARS], raw_len)  # fmt: skip
    if not text.strip():
        return Quarantined(source, "empty", "no text after stripping whitespace", "", raw_len)
    if len(text) > max_chars:
        return Quarantined(source, "too_large", f"{len(text):,} characters > max_document_chars {max_chars:,}",
                           text[:EXCERPT_CHARS], raw_len)  # fmt: skip
    return Doc(text=text, source=source, **meta)


def _jsonl(path: Path, label: str, text_field: str, max_chars: int) -> Iterator[Doc | Quarantined]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    # A raw line far beyond max_chars cannot hold an acceptable document (JSON escapes
    # at most ~6x), so it is quarantined before json.loads builds a huge object.
    raw_limit = 6 * max_chars + 1024
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                source = f"{label}:{lineno}"
                if not raw.strip():
                    continue
                if len(raw) > raw_limit:
                    yield Quarantined(source, "too_large", f"{len(raw):,}-byte line", "", len(raw))
                    continue
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield Quarantined(source, "invalid_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start}",
                                      raw[:EXCERPT_CHARS].decode("utf-8", "replace"), len(raw))  # fmt: skip
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Quarantined(source, "malformed_json", f"{e.msg} at column {e.colno}",
                                      line[:EXCERPT_CHARS], len(raw))  # fmt: skip
                    continue
                if not isinstance(record, dict):
                    yield Quarantined(source, "not_an_object", f"a JSON {type(record).__name__}",
                                      line[:EXCERPT_CHARS], len(raw))  # fmt: skip
                    continue
                if text_field not in record:
                    keys = ", ".join(sorted(map(str, record))[:10]) or "none"
                    yield Quarantined(source, "missing_text", f"no {text_field!r} field (fields: {keys})",
                                      line[:EXCERPT_CHARS], len(raw))  # fmt: skip
                    continue
                yield _check(record[text_field], source, len(raw), text_field, max_chars, _meta(record))
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise DataError(
            f"{path}: unreadable ({type(e).__name__}: {e}); re-compress it or remove it from the input"
        ) from None


def _text_file(path: Path, label: str, max_chars: int) -> Doc | Quarantined:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return Quarantined(label, "invalid_utf8", f"byte 0x{data[e.start]:02x} at offset {e.start}",
                           data[:EXCERPT_CHARS].decode("utf-8", "replace"), len(data))  # fmt: skip
    return _check(text, label, len(data), "text", max_chars, {})


def _columns(path: Path, kind: str, label: str, text_field: str, max_chars: int) -> Iterator[Doc | Quarantined]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}); rewrite or remove it") from None
        names = pf.schema_arrow.names
        batches: Any = None
    else:
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: cannot load the saved dataset ({type(e).__name__}); re-save it") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: saved DatasetDict has no 'train' split; point to one split's folder")
            ds, label = ds["train"], f"{label}/train"
        names = ds.column_names
    if text_field not in names:
        raise DataError(f"{path}: no {text_field!r} column (columns: {', '.join(names[:10])}); set text_field")
    columns = [text_field] + [c for c in META_FIELDS if c in names and c != text_field]
    if kind == "parquet":
        batches = (b.to_pydict() for b in pf.iter_batches(batch_size=1024, columns=columns))
    else:
        batches = ds.select_columns(columns).iter(batch_size=1024)
    row = 0
    for batch in batches:
        for i, value in enumerate(batch[text_field]):
            meta = {k: (None if batch[k][i] is None else str(batch[k][i])) for k in META_FIELDS if k in batch}
            size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0
            yield _check(value, f"{label}:{row}", size, text_field, max_chars, meta)
            row += 1
