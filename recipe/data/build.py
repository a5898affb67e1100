"""Tokenize a corpus and pack it into ``train`` and ``val`` shard sets.

``build_shards`` reads documents (``recipe.data.corpus``), drops and counts empty
ones, tokenizes in batches as ``[bos] + tokens + [eos]``, splits train/val by a hash
of the document text and writes ``<out_dir>/train`` and ``<out_dir>/val``
(``recipe.data.shards``), each document in the shards of its ``domain`` field
(``"default"`` when it has none) so that a data mix can sample the domains
separately. The whole ``out_dir`` is assembled in a temp sibling and renamed at the
end, so a failure (an empty corpus, a bad line, a crash) leaves nothing behind.

Why hash the *text*: the split then depends neither on the order of the corpus nor on
the batch size, and exact duplicates always land in the same split (a duplicate of
a validation document in train would leak it).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recipe.data.corpus import Document, iter_documents, list_inputs
from recipe.data.errors import DataError
from recipe.data.packing import Splitter, TokenizerLike, load_tokenizer
from recipe.data.shards import DEFAULT_DOMAIN, DEFAULT_SHARD_TOKENS, ShardWriter, atomic_dir, is_complete
from recipe.errors import ConfigError

__all__ = [
    "BuildReport", "build_shards", "check_data_source", "ensure_curated_data", "ensure_demo_data", "is_built",
    "load_tokenizer", "missing_data_error",
]

BATCH_CHARS = 4_000_000  # tokenize this much text per encode_batch call (bounded memory)
BATCH_DOCS = 4096
MAX_EXAMPLES = 10  # sources of dropped documents kept per reason in the report


def _tokenizer_name(tok: Any) -> str:
    return str(getattr(tok, "path", "") or type(tok).__name__)


@dataclass
class BuildReport:
    """What a build read, kept and dropped. Stored in each index.json under "report"."""

    corpus: str
    out_dir: str
    tokenizer: str
    text_field: str
    split_rule: str
    documents_read: int = 0
    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_examples: dict[str, list[str]] = field(default_factory=dict)
    # Kept documents and tokens per ``domain`` field (records without one: "default").
    domains: dict[str, dict[str, int]] = field(default_factory=dict)
    characters: int = 0
    wall_time_s: float = 0.0

    def drop(self, reason: str, doc: Document) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.dropped_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(doc.source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """Human-readable summary (what the CLI prints)."""
        kept = self.documents["train"] + self.documents["val"]
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        lines = [
            f"corpus      {self.corpus}",
            f"output      {self.out_dir}",
            f"tokenizer   {self.tokenizer}",
            f"documents   read {self.documents_read:,}, kept {kept:,} "
            f"(train {self.documents['train']:,}, val {self.documents['val']:,}), dropped {dropped}",
            f"tokens      train {self.tokens['train']:,}, val {self.tokens['val']:,}",
            *(
                f"  {name:<9} {d['documents']:,} documents, {d['tokens']:,} tokens"
                for name, d in sorted(self.domains.items())
            ),
            f"characters  {self.characters:,}",
            f"split       {self.split_rule}",
            f"wall time   {self.wall_time_s:.2f} s",
        ]
        for reason, examples in sorted(self.dropped_examples.items()):
            lines.append(f"dropped {reason} e.g. {', '.join(examples[:3])}")
        return "\n".join(lines)


def _hash01(text: str) -> float:
    """Deterministic uniform number in [0, 1) from the document text."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _reason_to_drop(doc: Document) -> str | None:
    if not doc.text.strip():
        return "empty"
    return None


def build_shards(
    corpus_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: TokenizerLike | str | os.PathLike | None = None,
    val_fraction: float = 0.01,
    val_documents: int | None = None,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    _publish: bool = True,
    _names: tuple[str, str] | None = None,
) -> BuildReport:
    """Build ``<out_dir>/train`` and ``<out_dir>/val`` shard sets from a corpus.

    ``val_documents`` (if given) overrides ``val_fraction``. ``log`` receives progress
    lines and the final report (default: print to stderr; pass ``lambda s: None`` to
    silence). Raises ``DataError`` for bad input; then no ``out_dir`` is left behind.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}; e.g. --val-fraction 0.01")
    if val_documents is not None and val_documents < 0:
        raise DataError(f"val_documents must be >= 0, got {val_documents}")
    log = log or (lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    out = Path(out_dir)
    # Fail before the (long) tokenization when the output would be refused at the end.
    if _publish and out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise DataError(
            f"output {out} already exists; remove it, choose another directory, or pass overwrite=True (--overwrite)"
        )
    list_inputs(corpus_path)  # a bad corpus path fails before the tokenizer loads
    tok = load_tokenizer(tokenizer)

    split_rule = (
        f"the {val_documents} documents with the smallest blake2b(text) hash go to val"
        if val_documents is not None
        else f"blake2b(text) < {val_fraction} goes to val (at least 1 document when >= 2)"
    )
    # _names: the corpus/output paths to record when building inside a temp directory.
    corpus_name, out_name = _names or (str(corpus_path), str(out))
    report = BuildReport(
        corpus=corpus_name, out_dir=out_name, tokenizer=_tokenizer_name(tok),
        text_field=text_field, split_rule=split_rule,
    )  # fmt: skip
    ctx = atomic_dir(out, overwrite=overwrite, what="output") if _publish else _nullcontext(out)
    with ctx as root:
        meta = dict(vocab_size=tok.n_words, bos_id=tok.bos_id, eos_id=tok.eos_id, tokenizer=report.tokenizer)
        train = ShardWriter(root / "train", shard_tokens=shard_tokens, **meta)
        val = ShardWriter(root / "val", shard_tokens=shard_tokens, **meta)
        try:
            splitter = Splitter(train, val, val_fraction, val_documents)
            batch: list[Document] = []
            chars = 0

            def flush() -> None:
                encoded = tok.encode_batch([d.text for d in batch], bos=True, eos=True)
                for doc, ids in zip(batch, encoded):
                    domain = doc.domain or DEFAULT_DOMAIN
                    splitter.add(_hash01(doc.text), np.asarray(ids, dtype=np.uint32), domain)
                    d = report.domains.setdefault(domain, {"documents": 0, "tokens": 0})
                    d["documents"] += 1
                    d["tokens"] += len(ids)
                batch.clear()

            for doc in iter_documents(corpus_path, text_field=text_field):
                report.documents_read += 1
                reason = _reason_to_drop(doc)
                if reason is not None:
                    report.drop(reason, doc)
                    continue
                batch.append(doc)
                chars += len(doc.text)
                report.characters += len(doc.text)
                if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                    flush()
                    chars = 0
            if batch:
                flush()
            splitter.finish()

            if splitter.count == 0:
                dropped = ", ".join(f"{v} {k}" for k, v in report.dropped.items()) or "none"
                raise DataError(
                    f"{corpus_path}: no non-empty documents (read {report.documents_read}, dropped {dropped}); "
                    f"add documents with text in field {text_field!r} or pass the right --text-field"
                )
            report.documents = {"train": train.num_documents, "val": val.num_documents}
            report.tokens = {"train": train.num_tokens, "val": val.num_tokens}
            report.wall_time_s = round(time.perf_counter() - t0, 3)
            train.close(report.to_dict())
            val.close(report.to_dict())
        except BaseException:
            train.abort()
            val.abort()
            raise
    log(report.format())
    return report


class _nullcontext:
    def __init__(self, value: Path) -> None:
        self.value = value

    def __enter__(self) -> Path:
        self.value.mkdir(parents=True, exist_ok=True)
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


def is_built(data_dir: str | os.PathLike) -> bool:
    """True when ``data_dir`` holds complete ``train`` and ``val`` shard sets."""
    d = Path(data_dir)
    return is_complete(d / "train") and is_complete(d / "val")


def ensure_demo_data(
    data_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    sdist: str | os.PathLike | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    **demo_options: Any,
) -> Path:
    """Build the demo corpus and its shards in ``data_dir`` unless already there.

    Safe against concurrent callers: a file lock ``<data_dir>.lock`` serialises them and
    the result is published by one atomic rename (``data_dir/corpus`` keeps the jsonl).
    ``demo_options`` go to ``recipe.data.demo.build_demo_corpus``.
    """
    from filelock import FileLock

    from recipe.data.demo import build_demo_corpus

    data_dir = Path(data_dir)
    log = log or (lambda s: print(s, file=sys.stderr))
    if is_built(data_dir) and not overwrite:
        return data_dir
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(data_dir.with_name(data_dir.name + ".lock"))):
        if is_built(data_dir) and not overwrite:
            return data_dir  # another process built it while we waited
        if data_dir.exists() and not overwrite and any(data_dir.iterdir()):
            raise DataError(
                f"{data_dir} exists but is not a complete data directory (needs train/index.json and val/index.json); "
                f"remove it, or build it with `recipe data build <corpus> {data_dir}`"
            )
        log(f"building the demo data set in {data_dir} (first use; a few seconds to a minute)")
        with atomic_dir(data_dir, overwrite=True, what="data directory") as tmp:
            corpus = build_demo_corpus(tmp / "corpus", sdist=sdist, log=log, **demo_options)
            names = (str(data_dir / "corpus" / corpus.name), str(data_dir))
            build_shards(corpus, tmp, tokenizer=tokenizer_path, log=log, _publish=False, _names=names)
    return data_dir


def ensure_curated_data(
    config_path: str | os.PathLike, data_dir: str | os.PathLike, log: Callable[[str], None] | None = None
) -> Path:
    """Run the curation config ``config_path`` unless ``data_dir`` (its output) is built.

    Serialised by the same ``<data_dir>.lock`` as the demo build, so ranks or runs that
    start together curate once.
    """
    from filelock import FileLock

    from recipe.data.curate.pipeline import curate

    data_dir = Path(data_dir)
    if is_built(data_dir):
        return data_dir
    cfg = check_curation_output(config_path, data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(data_dir.with_name(data_dir.name + ".lock"))):
        if not is_built(data_dir):
            (log or (lambda s: print(s, file=sys.stderr)))(
                f"curating {data_dir} with {config_path} (first use; about a minute on two cores)")
            curate(cfg, log=log, config_path=str(config_path))
    return data_dir


def check_curation_output(config_path: str | os.PathLike, data_dir: str | os.PathLike):
    """The parsed curation config, if it writes ``data_dir``; else a one-line ConfigError."""
    from recipe.data.curate.pipeline import load_config

    cfg = load_config(config_path)
    if Path(cfg.output).resolve() != Path(data_dir).resolve():
        raise ConfigError(f"data.curate_config {config_path} writes {cfg.output}, not data.data_dir {data_dir}; "
                          "make them the same directory")
    return cfg


def missing_data_error(data_dir: str | os.PathLike, curate_config: str | os.PathLike | None = None,
                       curate_output: str | os.PathLike | None = None) -> DataError:
    """The one-line error for a data directory that is not built and will not be built on first use.

    It names what is missing first (the directory, or its complete train/val shard sets),
    then the commands that build it; with a curation config that writes elsewhere, also why
    that config does not build it.
    """
    d = Path(data_dir)
    what = (f"data.data_dir {d} does not exist" if not d.exists()
            else f"data.data_dir {d} has no complete train/val shard sets")
    build = f"`recipe data build <corpus> {d}`"
    if curate_config is not None:
        return DataError(f"{what}; build it with {build} or `recipe data curate --config {curate_config} --output {d}` "
                         f"(data.curate_config {curate_config} writes {curate_output}, so it does not build {d} on "
                         "first use)")
    return DataError(f"{what}; build it with {build} or `recipe data demo --out {d}` "
                     "(or set data.build_demo: true to build the demo corpus there on first use)")


def check_data_source(data_dir: str | os.PathLike, curate_config: str | os.PathLike | None,
                      build_demo: bool) -> str:
    """How a data directory that is not built yet gets built: ``"curate"`` or ``"demo"``.

    Raises ``missing_data_error`` when neither applies: no curation config writes
    ``data_dir`` and the demo build is off. A curation config that writes another directory
    is taken as a sign that ``data_dir`` was meant to hold the user's own data, so the
    error names the missing directory, not the two paths' mismatch.
    """
    if curate_config is not None:
        from recipe.data.curate.pipeline import load_config

        output = load_config(curate_config).output
        if Path(output).resolve() == Path(data_dir).resolve():
            return "curate"
        raise missing_data_error(data_dir, curate_config, output)
    if build_demo:
        return "demo"
    raise missing_data_error(data_dir)
