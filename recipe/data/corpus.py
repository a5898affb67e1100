"""Read raw documents from disk: the first stage of the one-way data flow.

Supported inputs (``iter_documents``):
  * ``*.jsonl`` / ``*.jsonl.gz``: one JSON object per line, text in ``text_field``;
  * ``*.parquet``: one row per document, text in column ``text_field``;
  * ``*.txt`` / ``*.md``: the whole file is one document;
  * a Hugging Face dataset saved with ``save_to_disk`` (a ``DatasetDict`` gives its
    ``train`` split);
  * a folder of any mix of these, walked recursively in sorted order (hidden
    entries skipped) so that every run sees the documents in the same order.

The reader yields every record, empty ones included: dropping and *counting*
them is the build's job (``recipe.data.build``), so the report can say how many
were dropped and why. Anything malformed is a ``DataError`` naming the file, the
line (or row) and the fix, on one line.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.data.errors import DataError

__all__ = ["DataError", "Document", "iter_documents", "list_inputs", "SUPPORTED"]

SUPPORTED = ".jsonl, .jsonl.gz, .parquet, .txt, .md or a saved Hugging Face dataset"
# Optional metadata carried along when a record has it (curation stages use them).
META_FIELDS = ("url", "date", "domain")
# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` always write.
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_TEXT_SUFFIXES = (".txt", ".md")
_REENCODE = "re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)"


@dataclass(frozen=True)
class Document:
    """One raw document. ``source`` says where it came from, e.g. ``"web/a.jsonl:12"``."""

    text: str
    source: str
    url: str | None = None
    date: str | None = None
    domain: str | None = None


def corpus_kind(path: Path) -> str | None:
    """Which reader handles ``path`` (None: not a supported input)."""
    if path.is_dir():
        return "hf" if any((path / m).is_file() for m in _HF_MARKERS) else None
    name = path.name.lower()
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    return None


def _walk(folder: Path) -> Iterator[tuple[Path, str]]:
    """Supported inputs under ``folder``, depth first, each level sorted by name."""
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):  # .git, .cache, editor droppings
            continue
        kind = corpus_kind(entry)
        if kind is not None:
            yield entry, kind
        elif entry.is_dir():
            yield from _walk(entry)


def list_inputs(path: str | os.PathLike) -> list[tuple[Path, str]]:
    """The files/datasets ``iter_documents(path)`` will read, with their reader kind."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"corpus path {root} does not exist; check the path (a {SUPPORTED} file, or a folder of them)")
    kind = corpus_kind(root)
    if kind is not None:
        return [(root, kind)]
    if root.is_dir():
        found = list(_walk(root))
        if found:
            return found
        raise DataError(
            f"{root} contains no supported files ({SUPPORTED}); put documents there or point to another folder"
        )
    raise DataError(
        f'{root} is not a supported input ({SUPPORTED}); convert it to jsonl with one {{"text": ...}} object per line'
    )


def iter_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[Document]:
    """Yield every document under ``path`` in a deterministic order (empty ones included)."""
    root = Path(path)
    inputs = list_inputs(root)
    for item, kind in inputs:
        # Sources are relative to the corpus root so they do not depend on where it lives.
        label = item.name if item == root else item.relative_to(root).as_posix()
        if kind == "jsonl":
            yield from _read_jsonl(item, label, text_field)
        elif kind == "parquet":
            yield from _read_parquet(item, label, text_field)
        elif kind == "text":
            yield _read_text_file(item, label)
        else:
            yield from _read_hf(item, label, text_field)


# --------------------------------------------------------------------------- readers


def _meta(record: dict[str, Any]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key in META_FIELDS:
        value = record.get(key)
        out[key] = None if value is None else str(value)
    return out


def _text_of(value: Any, where: str, text_field: str) -> str:
    """The document text; ``None`` counts as an empty document (dropped and counted later)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {text_field!r} is a {type(value).__name__}, not a string; "
            f"fix the record or choose another field with text_field / --text-field"
        )
    return value


def _read_jsonl(path: Path, label: str, text_field: str) -> Iterator[Document]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    offset = 0  # byte offset of the current line in the (decompressed) stream
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: invalid UTF-8 byte 0x{raw[e.start]:02x} at byte offset {start + e.start}; "
                        f"{_REENCODE}"
                    ) from None
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) are not documents
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                        f"each line must be one JSON object - fix or remove that line"
                    ) from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path}:{lineno}: expected a JSON object, got a {type(record).__name__}; "
                        f'write one {{"{text_field}": ...}} object per line'
                    )
                if text_field not in record:
                    keys = ", ".join(sorted(record)[:10]) or "none"
                    raise DataError(
                        f"{path}:{lineno}: record has no {text_field!r} field (fields: {keys}); "
                        f"pass the right field name with text_field / --text-field"
                    )
                where = f"{path}:{lineno}"
                text = _text_of(record[text_field], where, text_field)
                yield Document(text=text, source=f"{label}:{lineno}", **_meta(record))
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: corrupt gzip stream ({e}); re-compress it or decompress to plain .jsonl") from None


def _read_text_file(path: Path, label: str) -> Document:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: some editors prepend a byte-order mark
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: invalid UTF-8 byte 0x{data[e.start]:02x} at byte offset {e.start}; {_REENCODE}"
        ) from None
    return Document(text=text, source=label)


def _check_columns(names: Iterable[str], where: Path, text_field: str) -> None:
    names = list(names)
    if text_field not in names:
        cols = ", ".join(names[:10]) or "none"
        raise DataError(
            f"{where}: no {text_field!r} column (columns: {cols}); "
            f"pass the right column name with text_field / --text-field"
        )


def _rows(batches: Iterable[dict[str, list[Any]]], path: Path, label: str, text_field: str) -> Iterator[Document]:
    """Documents from column batches (parquet and HF datasets share this)."""
    row = 0
    for batch in batches:
        texts = batch[text_field]
        metas = {k: batch[k] for k in META_FIELDS if k in batch}
        for i, value in enumerate(texts):
            text = _text_of(value, f"{path} row {row}", text_field)
            meta = {k: (None if v[i] is None else str(v[i])) for k, v in metas.items()}
            yield Document(text=text, source=f"{label}:{row}", **meta)
            row += 1


def _read_parquet(path: Path, label: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq  # optional heavy import, only when parquet is read

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}); rewrite it or remove it") from None
    names = pf.schema_arrow.names
    _check_columns(names, path, text_field)
    columns = [text_field] + [c for c in META_FIELDS if c in names and c != text_field]
    batches = (b.to_pydict() for b in pf.iter_batches(batch_size=1024, columns=columns))
    yield from _rows(batches, path, label, text_field)


def _read_hf(path: Path, label: str, text_field: str) -> Iterator[Document]:
    import datasets  # heavy import, only when a saved dataset is read

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(
            f"{path}: cannot load the saved Hugging Face dataset ({type(e).__name__}: {e}); "
            f"re-save it with Dataset.save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            splits = ", ".join(sorted(ds)) or "none"
            raise DataError(
                f"{path}: saved DatasetDict has no 'train' split (splits: {splits}); "
                f"point to one split's folder, e.g. {path / sorted(ds)[0] if len(ds) else path}"
            )
        ds, label = ds["train"], f"{label}/train"
    _check_columns(ds.column_names, path, text_field)
    columns = [text_field] + [c for c in META_FIELDS if c in ds.column_names and c != text_field]
    batches = ds.select_columns(columns).iter(batch_size=1024)
    yield from _rows(batches, path, label, text_field)
