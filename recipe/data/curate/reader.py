"""Read raw documents leniently: every bad record is quarantined with a reason, never a crash.

``recipe.data.corpus`` stops at the first bad line, which is right for a build of a
trusted corpus; a web crawl has bad lines by the thousand. Here each record is either
a ``Doc``, a ``Quarantined`` with one of: ``invalid_utf8``, ``malformed_json``,
``not_an_object``, ``missing_text``, ``text_not_string``, ``empty``, ``too_large``, or a
``Skipped`` WARC record that is not a document (requests, metadata, images, redirects),
counted by reason in the report. Problems with a whole input (missing path, unreadable
parquet or WARC, no text column) stay ``DataError``: no document of that input can be
read, so the run should stop.

Inputs are local paths or fsspec URLs (``file://``, ``memory://``, ``s3://`` with s3fs
installed...): a file, or a folder walked recursively in sorted order. Besides jsonl,
parquet, text files and saved datasets (those local only), web archives are read:
``.warc`` / ``.warc.gz`` through FastWARC. Only ``response`` records with a 2xx status
and an HTML (``text/html``, ``application/xhtml+xml``) or ``text/plain`` payload become
documents; HTML goes to text with Resiliparse's main-content extraction. The URL and
the date are the record's ``WARC-Target-URI`` and ``WARC-Date``; the source is
``<file>:<byte offset of the record>``.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from recipe.data.corpus import META_FIELDS, SUPPORTED, corpus_kind
from recipe.data.curate.record import Doc
from recipe.data.errors import DataError

__all__ = ["Input", "Quarantined", "Skipped", "list_sources", "read_input", "read_records"]

EXCERPT_CHARS = 500
WARC_SUFFIXES = (".warc", ".warc.gz")
SUPPORTED_INPUTS = SUPPORTED.replace(" or a saved", ", .warc, .warc.gz or a saved")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_TEXT_TYPES = ("text/plain",)


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


@dataclass(frozen=True)
class Skipped:
    """A WARC record that is not a document (a request, metadata, an image, a redirect)."""

    source: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Input:
    """One file (or saved dataset) to read: local, or on an fsspec filesystem."""

    location: str  # a local path, or the path within ``fs``
    kind: str  # jsonl, parquet, text, hf, warc
    label: str  # relative to the input root: the start of every document's source
    fs: Any = None  # an fsspec filesystem; None for a local path

    def open(self) -> IO[bytes]:
        return open(self.location, "rb") if self.fs is None else self.fs.open(self.location, "rb")


def _input_kind(name: str, is_dir: bool) -> str | None:
    if not is_dir and name.lower().endswith(WARC_SUFFIXES):
        return "warc"
    return None


def _walk_local(folder: Path) -> Iterator[Path]:
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):  # .git, .cache, editor droppings
            continue
        if _input_kind(entry.name, entry.is_dir()) or corpus_kind(entry):
            yield entry
        elif entry.is_dir():
            yield from _walk_local(entry)


def _local_sources(root: Path) -> list[Input]:
    if not root.exists():
        raise DataError(f"input path {root} does not exist; check the path (a {SUPPORTED_INPUTS} file, or a "
                        f"folder of them)")  # fmt: skip
    items = [root] if (_input_kind(root.name, root.is_dir()) or corpus_kind(root)) else []
    if not items and root.is_dir():
        items = list(_walk_local(root))
        if not items:
            raise DataError(f"{root} contains no supported files ({SUPPORTED_INPUTS}); put documents there or "
                            f"point to another folder")  # fmt: skip
    if not items:
        raise DataError(f'{root} is not a supported input ({SUPPORTED_INPUTS}); convert it to jsonl with one '
                        f'{{"text": ...}} object per line')  # fmt: skip
    return [Input(str(p), _input_kind(p.name, p.is_dir()) or corpus_kind(p) or "", p.name if p == root else
                  p.relative_to(root).as_posix()) for p in items]  # fmt: skip


def _remote_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(WARC_SUFFIXES):
        return "warc"
    if lower.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".txt", ".md")):
        return "text"
    return None


def _remote_sources(url: str) -> list[Input]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package is missing
        raise DataError(f"cannot open input {url} ({e}); install the fsspec backend for its protocol or "
                        f"give a local path") from None  # fmt: skip
    try:
        exists, is_dir = fs.exists(path), fs.isdir(path)
        names = sorted(fs.find(path)) if is_dir else []
    except OSError as e:  # no permission, no connection
        raise DataError(f"cannot list input {url} ({type(e).__name__}: {e}); check the URL and its credentials") from None
    if not exists:
        raise DataError(f"input {url} does not exist; check the URL")
    if not is_dir:
        kind = _remote_kind(path)
        if kind is None:
            raise DataError(f"{url} is not a supported input ({SUPPORTED_INPUTS}); a saved dataset must be local")
        return [Input(path, kind, path.rstrip("/").rsplit("/", 1)[-1], fs)]
    base = path.rstrip("/") + "/"
    found = []
    for name in names:
        rel = name[len(base):] if name.startswith(base) else name.rsplit("/", 1)[-1]
        kind = _remote_kind(name)
        if kind is not None and not any(part.startswith(".") for part in rel.split("/")):
            found.append(Input(name, kind, rel, fs))
    if not found:
        raise DataError(f"{url} contains no supported files ({SUPPORTED_INPUTS}); a saved dataset must be local")
    # The order of a local walk (each folder's entries sorted by name), so a copy reads the same.
    return sorted(found, key=lambda item: item.label.split("/"))


def list_sources(root: str | os.PathLike) -> list[Input]:
    """The inputs under ``root`` (a local path or an fsspec URL), in the order they are read."""
    text = os.fspath(root)
    if "://" in text and not text.startswith("file://"):
        return _remote_sources(text)
    if text.startswith("file://"):  # read as a local path: saved datasets work too, and labels are the same
        import fsspec

        text = fsspec.core.url_to_fs(text)[1]
    return _local_sources(Path(text))


def read_records(
    paths: str | os.PathLike | list[str | os.PathLike], text_field: str = "text", max_chars: int = 1_000_000
) -> Iterator[Doc | Quarantined | Skipped]:
    """Every record of every input, in a deterministic order, as a ``Doc``, ``Quarantined`` or ``Skipped``."""
    roots = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    for root in roots:
        for item in list_sources(root):
            yield from read_input(item, text_field, max_chars)


def read_input(item: Input, text_field: str = "text",
               max_chars: int = 1_000_000) -> Iterator[Doc | Quarantined | Skipped]:  # fmt: skip
    """Every record of one input (one of ``list_sources``), in order."""
    if item.kind == "jsonl":
        yield from _jsonl(item, text_field, max_chars)
    elif item.kind == "text":
        yield _text_file(item, max_chars)
    elif item.kind == "warc":
        yield from _warc(item, max_chars)
    else:
        yield from _columns(item, text_field, max_chars)


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


def _jsonl(item: Input, text_field: str, max_chars: int) -> Iterator[Doc | Quarantined]:
    label = item.label
    # A raw line far beyond max_chars cannot hold an acceptable document (JSON escapes
    # at most ~6x), so it is quarantined before json.loads builds a huge object.
    raw_limit = 6 * max_chars + 1024
    try:
        with item.open() as raw_file, _maybe_gunzip(raw_file, item.location) as f:
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
            f"{item.location}: unreadable ({type(e).__name__}: {e}); re-compress it or remove it from the input"
        ) from None


def _maybe_gunzip(f: IO[bytes], name: str) -> IO[bytes]:
    return gzip.GzipFile(fileobj=f, mode="rb") if name.lower().endswith(".gz") else f  # type: ignore[return-value]


def _text_file(item: Input, max_chars: int) -> Doc | Quarantined:
    with item.open() as f:
        data = f.read()
    label = item.label
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return Quarantined(label, "invalid_utf8", f"byte 0x{data[e.start]:02x} at offset {e.start}",
                           data[:EXCERPT_CHARS].decode("utf-8", "replace"), len(data))  # fmt: skip
    return _check(text, label, len(data), "text", max_chars, {})


def _columns(item: Input, text_field: str, max_chars: int) -> Iterator[Doc | Quarantined]:
    kind, label, path = item.kind, item.label, item.location
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path if item.fs is None else item.open())
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


def _decode_content(body: bytes, coding: str | None) -> tuple[bytes, str | None]:
    """The payload without its HTTP Content-Encoding (gzip, deflate, br), or a problem."""
    coding = (coding or "").strip().lower()
    try:
        if coding in ("", "identity"):
            return body, None
        if coding in ("gzip", "x-gzip"):
            return gzip.decompress(body), None
        if coding == "deflate":  # zlib-wrapped as the RFC says, or raw as some servers send it
            try:
                return zlib.decompress(body), None
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS), None
        if coding == "br":
            import brotli  # installed with FastWARC

            return brotli.decompress(body), None
    except Exception as e:  # gzip, zlib and brotli each raise their own error types
        return body, f"Content-Encoding {coding}: {type(e).__name__}"
    return body, f"unsupported Content-Encoding {coding!r}"


def _warc(item: Input, max_chars: int) -> Iterator[Doc | Quarantined | Skipped]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding
    from resiliparse.parse.html import HTMLTree

    label = item.label
    try:
        with item.open() as f:
            # stream_detect: gzip members (.warc.gz, one per record) are recognized by their magic bytes.
            for rec in ArchiveIterator(f, record_types=WarcRecordType.any_type, parse_http=True, stream_detect=True):
                source = f"{label}:{rec.stream_pos}"
                kind = str(rec.record_type).rsplit(".", 1)[-1]  # "request", "warcinfo"... on every FastWARC version
                if rec.record_type != WarcRecordType.response:
                    yield Skipped(source, f"warc_{kind}")
                    continue
                if not rec.is_http:
                    yield Skipped(source, "warc_response_not_http")
                    continue
                status = rec.http_headers.status_code if rec.http_headers is not None else 0
                if not 200 <= status < 300:
                    yield Skipped(source, f"http_status_{status // 100}xx", str(status))
                    continue
                mime = (rec.http_content_type or "").lower()
                if mime not in _HTML_TYPES and mime not in _TEXT_TYPES:
                    yield Skipped(source, "content_type_not_text", mime or "none")
                    continue
                body = rec.reader.read()
                if len(body) < rec.content_length:
                    # FastWARC ends quietly at a cut; the rest of the file (this record included) is lost.
                    raise DataError(f"{item.location}: truncated at the record at byte {rec.stream_pos} "
                                    f"({len(body):,} of {rec.content_length:,} payload bytes); re-download it or "
                                    f"remove it from the input")  # fmt: skip
                body, problem = _decode_content(body, rec.http_headers.get("Content-Encoding"))
                if problem is not None:
                    yield Quarantined(source, "bad_content_encoding", problem, "", rec.content_length)
                    continue
                meta = {"url": (rec.headers.get("WARC-Target-URI") or "").strip("<> ") or None,
                        "date": rec.headers.get("WARC-Date") or None, "domain": None}  # fmt: skip
                if len(body) > 6 * max_chars:  # no text extraction on a payload that cannot fit
                    yield Quarantined(source, "too_large", f"{len(body):,}-byte payload", "", len(body))
                    continue
                # The charset the server declared wins; else it is detected from the bytes.
                encoding = rec.http_charset or detect_encoding(body)
                if mime in _HTML_TYPES:
                    tree = HTMLTree.parse_from_bytes(body, encoding)
                    text = extract_plain_text(tree, main_content=True, preserve_formatting=True, alt_texts=False)
                else:
                    text = bytes_to_str(body, encoding)
                yield _check(text, source, len(body), "payload", max_chars, meta)
    except OSError as e:
        raise DataError(f"{item.location}: unreadable WARC ({type(e).__name__}: {e}); re-download it or remove it "
                        f"from the input") from None  # fmt: skip
