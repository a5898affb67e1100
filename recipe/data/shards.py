"""On-disk token shards: the contract between the build and the token stream.

A *shard set* is a directory::

    index.json                 written LAST: its presence means "complete"
    shard_00000.tokens.npy     flat uint32 ids of consecutive documents,
                               each document = [bos] + tokens + [eos]
    shard_00000.docs.npy       uint64 start offset of each document in that shard
    shard_00001.tokens.npy ...

``index.json``::

    {"format": "llama3-recipe-shards", "version": 1, "dtype": "uint32",
     "vocab_size": int, "bos_id": int, "eos_id": int, "tokenizer": str,
     "num_tokens": int, "num_documents": int,
     "shards": [{"name": "shard_00000", "num_tokens": int, "num_documents": int,
                 "domain": str, "checksum": {"tokens": "crc32:<hex>", "docs": "crc32:<hex>"}},
                ...],
     "report": {...}}

``checksum`` is the CRC-32 of each file's bytes, recorded when the shard is written.
The first time a process opens a shard's tokens (``ShardSet.shards``) it reads the
shard once: the checksums are compared with the index and the largest token id with
``vocab_size``, so a corrupt or foreign shard stops with a one-line ``DataError``
naming the file instead of training on garbage or failing in the embedding. An index
written before shards carried a checksum still loads; only the range check runs for
it. ``recipe data verify`` runs the same checks on every shard of a set.

Every shard holds documents of one domain only, so a domain is a group of shard files
and a per-domain view costs no copy. An index written before shards carried a domain
reads as one domain, ``"default"``.

A set is written into ``<out_dir>.tmp-<pid>`` and renamed to ``out_dir`` only when
complete, so a crash never leaves a directory a later run mistakes for finished data.

``ShardSet.window(start, length)`` reads ANY global token offset: the set is an
endless repetition of itself (one endless epoch, see DESIGN.md), and document ids
are unique per (epoch, document) so the attention mask never joins two documents.
``ShardSet.domain(name)`` is the same over the shards of one domain only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from recipe.data.errors import DataError

__all__ = [
    "DEFAULT_DOMAIN", "FORMAT", "VERSION", "ShardWriter", "ShardSet", "atomic_dir", "check_free", "file_checksum",
    "index_domains", "is_complete",
]

FORMAT = "llama3-recipe-shards"
VERSION = 1
DEFAULT_DOMAIN = "default"  # documents without a domain, and every shard of an older index
DTYPE = np.uint32
# 2**26 tokens = 256 MiB per tokens file: big enough that the file count stays small,
# small enough that the writer's in-memory buffer stays modest.
DEFAULT_SHARD_TOKENS = 1 << 26
_REBUILD = "rebuild it with `recipe data build`"
_CHUNK = 1 << 24  # bytes per read when hashing a file
# Shards this process has already verified: (resolved tokens path, size, mtime_ns). A view,
# a second ShardSet of the same directory or a forked DataLoader worker skips them.
_VERIFIED: set[tuple[str, int, int]] = set()


def file_checksum(path: str | os.PathLike) -> str:
    """``"crc32:<8 hex digits>"`` of the file's bytes, read sequentially in 16 MiB pieces."""
    crc = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"crc32:{crc:08x}"


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` is a finished shard set (its index.json exists)."""
    return (Path(path) / "index.json").is_file()


def index_domains(path: str | os.PathLike) -> list[str]:
    """The sorted domains of the finished shard set ``path``, read from its index alone.

    For the launcher's config checks, which need the domains but must not open (and
    verify) every shard file the way ``ShardSet`` does.
    """
    index_path = Path(path) / "index.json"
    try:
        shards = json.loads(index_path.read_text())["shards"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{index_path}: unreadable index ({type(e).__name__}); {_REBUILD}") from None
    return sorted({str(s.get("domain") or DEFAULT_DOMAIN) for s in shards})


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temp sibling ``<out_dir>.tmp-<pid>``; rename it to ``out_dir`` on success.

    On an exception the temp dir is removed and ``out_dir`` is untouched. An existing
    non-empty ``out_dir`` is an error unless ``overwrite``; then it is replaced (the old
    one is moved aside first because rename() cannot replace a non-empty directory).
    """
    out = Path(out_dir)
    check_free(out, overwrite, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    _remove(tmp)  # leftover of a crashed run of ours with the same pid
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if out.exists():
            check_free(out, overwrite, what)  # it may have appeared while we worked
            _remove(old)
            os.replace(out, old)
        os.replace(tmp, out)
        _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def check_free(out: Path, overwrite: bool, what: str) -> None:
    """Raise the one-line error ``atomic_dir`` gives when ``out`` holds something and ``overwrite`` is off."""
    if overwrite or not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return  # an empty directory holds nothing to lose
    raise DataError(
        f"{what} {out} already exists; remove it, choose another directory, or pass overwrite=True (--overwrite)"
    )


def _write_shard(folder: Path, entry: dict[str, Any], parts: list[np.ndarray]) -> None:
    """Write one shard's token and document-start files and add their checksums to ``entry``."""
    lengths = np.fromiter((p.size for p in parts), dtype=np.uint64, count=len(parts))
    starts = np.zeros(len(lengths), dtype=np.uint64)
    np.cumsum(lengths[:-1], out=starts[1:])
    tok_path, doc_path = folder / f"{entry['name']}.tokens.npy", folder / f"{entry['name']}.docs.npy"
    np.save(tok_path, np.concatenate(parts))
    np.save(doc_path, starts)
    # Hash the files as written (just written, so read back from the page cache).
    entry["checksum"] = {"tokens": file_checksum(tok_path), "docs": file_checksum(doc_path)}


class ShardWriter:
    """Append tokenized documents; ``close()`` writes index.json last and publishes the set.

    Usable as a context manager: an exception inside the ``with`` block aborts the
    write and leaves nothing at ``out_dir``. One shard per domain is open at a time (so
    the in-memory buffer is up to ``shard_tokens`` per domain), which keeps every shard
    file single-domain without a second pass over the data.

    With ``write_threads`` > 1 the write is partitioned by shard: a full shard's files are
    written and checksummed by a thread of their own (numpy's file writes and zlib release
    the GIL) while documents keep arriving, at most ``write_threads + 1`` shards in flight.
    Which documents go to which shard, the names and the index are decided here, in order,
    as before, so the files are the same bytes whatever the thread count.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        vocab_size: int,
        bos_id: int,
        eos_id: int,
        tokenizer: str = "",
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        overwrite: bool = False,
        write_threads: int = 1,
    ) -> None:
        if not 0 < vocab_size <= np.iinfo(DTYPE).max + 1:
            raise DataError(f"vocab_size {vocab_size} does not fit in {np.dtype(DTYPE).name}; use a smaller vocabulary")
        if shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.vocab_size, self.bos_id, self.eos_id = int(vocab_size), int(bos_id), int(eos_id)
        self.tokenizer = str(tokenizer)
        self.shard_tokens = int(shard_tokens)
        self._ctx = atomic_dir(self.out_dir, overwrite=overwrite, what="shard set")
        self._tmp = self._ctx.__enter__()  # checks out_dir up front, before any work is done
        self._open: dict[str, list[np.ndarray]] = {}  # domain -> documents of its open shard
        self._open_tokens: dict[str, int] = {}
        self._shards: list[dict[str, Any]] = []
        self._closed = False
        self._pool = ThreadPoolExecutor(write_threads, thread_name_prefix="shard-write") if write_threads > 1 else None
        self._in_flight: deque[Future] = deque()
        self._max_in_flight = max(1, write_threads) + 1

    # -- writing
    def add(self, tokens: Sequence[int] | np.ndarray, domain: str | None = None) -> None:
        """Append one document, already wrapped as ``[bos] + tokens + [eos]``, to ``domain``.

        ``domain`` None or empty means ``"default"``. Documents of different domains never share a shard.
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        doc = np.asarray(tokens)
        if doc.ndim != 1 or doc.size < 2 or doc[0] != self.bos_id or doc[-1] != self.eos_id:
            raise DataError(
                f"a document must be [bos={self.bos_id}] + tokens + [eos={self.eos_id}]; encode with bos=True, eos=True"
            )
        if doc.min() < 0 or doc.max() >= self.vocab_size:
            raise DataError(f"token id out of range [0, {self.vocab_size}); the tokenizer does not match vocab_size")
        name = str(domain) if domain else DEFAULT_DOMAIN
        parts = self._open.setdefault(name, [])
        open_tokens = self._open_tokens.get(name, 0)
        if open_tokens and open_tokens + doc.size > self.shard_tokens:
            self._flush(name)  # documents never straddle shards; a huge one gets a shard of its own
            parts, open_tokens = self._open.setdefault(name, []), 0
        parts.append(doc.astype(DTYPE, copy=False))
        self._open_tokens[name] = open_tokens + doc.size

    def _flush(self, domain: str) -> None:
        parts = self._open.pop(domain, [])
        part_tokens = self._open_tokens.pop(domain, 0)
        if not parts:
            return
        name = f"shard_{len(self._shards):05d}"
        entry = {"name": name, "num_tokens": int(part_tokens), "num_documents": len(parts), "domain": domain}
        self._shards.append(entry)
        if self._pool is None:
            _write_shard(self._tmp, entry, parts)
            return
        while len(self._in_flight) >= self._max_in_flight:
            self._in_flight.popleft().result()  # bounds the memory of shards waiting to be written
        self._in_flight.append(self._pool.submit(_write_shard, self._tmp, entry, parts))

    def _settle(self) -> None:
        """Before the temporary folder is removed: no thread may still write into it."""
        for future in self._in_flight:
            future.cancel()
        with contextlib.suppress(Exception):
            self._wait()
        self._stop_threads()

    def _stop_threads(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _wait(self) -> None:
        """Every shard handed to a thread is on disk (a write's error is raised here)."""
        while self._in_flight:
            self._in_flight.popleft().result()

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self._shards) + sum(self._open_tokens.values())

    @property
    def num_documents(self) -> int:
        return sum(s["num_documents"] for s in self._shards) + sum(len(p) for p in self._open.values())

    # -- finishing
    def close(self, report: dict[str, Any] | None = None) -> Path:
        """Flush, write index.json (last), rename the temp dir to ``out_dir``; return it."""
        if self._closed:
            return self.out_dir
        try:
            for domain in sorted(self._open):  # the last shards in a fixed order, not dict insertion order
                self._flush(domain)
            self._wait()
            self._stop_threads()
            index = {
                "format": FORMAT,
                "version": VERSION,
                "dtype": np.dtype(DTYPE).name,
                "vocab_size": self.vocab_size,
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                "tokenizer": self.tokenizer,
                "num_tokens": sum(s["num_tokens"] for s in self._shards),
                "num_documents": sum(s["num_documents"] for s in self._shards),
                "shards": self._shards,
                "report": report or {},
            }
            tmp_index = self._tmp / "index.json.partial"
            tmp_index.write_text(json.dumps(index, indent=1) + "\n")
            os.replace(tmp_index, self._tmp / "index.json")
        except BaseException as e:
            self._closed = True
            self._settle()
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        self._closed = True
        self._ctx.__exit__(None, None, None)  # the atomic rename
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far; ``out_dir`` is left as it was."""
        if not self._closed:
            self._closed = True
            self._settle()
            err = RuntimeError("ShardWriter aborted")
            with contextlib.suppress(RuntimeError):
                self._ctx.__exit__(RuntimeError, err, None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without close() (e.g. an exception outside a with-block)
        # must not leave its temp directory behind.
        if not getattr(self, "_closed", True):
            self.abort()


class ShardSet:
    """A complete shard set opened read-only (token files memory-mapped)."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        # verify: check each shard's checksum and token range the first time this process opens it.
        self.verify = bool(verify)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise DataError(f"{self.path} is not a complete shard set (no index.json); {_REBUILD}")
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{index_path}: unreadable index ({type(e).__name__}); {_REBUILD}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{index_path}: not a {FORMAT} index; {_REBUILD}")
        if index.get("version") != VERSION:
            raise DataError(
                f"{index_path}: format version {index.get('version')!r}, this code reads version {VERSION}; {_REBUILD}"
            )
        if index.get("dtype") != np.dtype(DTYPE).name:
            raise DataError(f"{index_path}: dtype {index.get('dtype')!r}, expected {np.dtype(DTYPE).name}; {_REBUILD}")
        self.index: dict[str, Any] = index
        self.vocab_size: int = int(index["vocab_size"])
        self.bos_id: int = int(index["bos_id"])
        self.eos_id: int = int(index["eos_id"])
        self.tokenizer: str = str(index.get("tokenizer", ""))
        self.report: dict[str, Any] = index.get("report", {})
        self.num_tokens: int = int(index["num_tokens"])
        self.num_documents: int = int(index["num_documents"])

        shards = index["shards"]
        # Per shard: {"tokens": ..., "docs": ...} or None for an index written before checksums.
        self.shard_checksums: list[dict[str, str] | None] = [s.get("checksum") or None for s in shards]
        self.shard_names: list[str] = [s["name"] for s in shards]
        self.shard_domains: list[str] = [str(s.get("domain") or DEFAULT_DOMAIN) for s in shards]
        sizes = np.array([int(s["num_tokens"]) for s in shards], dtype=np.int64)
        if int(sizes.sum()) != self.num_tokens or sum(int(s["num_documents"]) for s in shards) != self.num_documents:
            raise DataError(f"{index_path}: shard sizes do not add up to the totals; {_REBUILD}")
        self._shard_sizes = sizes
        self._shard_docs = np.array([int(s["num_documents"]) for s in shards], dtype=np.int64)
        # Global token offset where each shard starts (plus the end, for searchsorted).
        self._shard_starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self._shard_starts[1:])
        doc_starts = []
        for shard, start in zip(shards, self._shard_starts[:-1]):
            docs = self._check_shard(shard)
            doc_starts.append(docs.astype(np.int64) + start)
        # Global start offset of every document, in order (document d = [starts[d], starts[d+1])).
        self.doc_starts: np.ndarray = np.concatenate(doc_starts) if doc_starts else np.zeros(0, np.int64)
        self._tokens: list[np.ndarray] | None = None
        self.selected_domain: str | None = None  # set on a view made by domain()
        self._views: dict[str, ShardSet] = {}

    # ------------------------------------------------------------ domains
    @property
    def domains(self) -> list[str]:
        """Names of the domains of this set, sorted."""
        return sorted(set(self.shard_domains))

    @property
    def domain_tokens(self) -> dict[str, int]:
        """Tokens per domain (sorted by name)."""
        return self._per_domain(self._shard_sizes)

    @property
    def domain_documents(self) -> dict[str, int]:
        """Documents per domain (sorted by name)."""
        return self._per_domain(self._shard_docs)

    def _per_domain(self, per_shard) -> dict[str, int]:
        totals = {name: 0 for name in self.domains}
        for name, n in zip(self.shard_domains, per_shard):
            totals[name] += int(n)
        return totals

    def domain(self, name: str) -> ShardSet:
        """A view of the shards of domain ``name``: the same ``window`` semantics over its own documents.

        The view shares nothing mutable with this set and opens only its own shard files.
        """
        if name not in self.shard_domains:
            raise DataError(f"{self.path} has no domain {name!r}; choose one of its domains: {', '.join(self.domains)}")
        if self.selected_domain is not None:
            return self  # a view holds one domain, and it is this one
        if name not in self._views:
            self._views[name] = self._view([i for i, d in enumerate(self.shard_domains) if d == name], name)
        return self._views[name]

    def _view(self, keep: list[int], name: str) -> ShardSet:
        view = object.__new__(ShardSet)
        view.__dict__.update(self.__dict__)  # metadata, report and ``index`` stay the whole set's
        doc_bounds = np.zeros(len(self._shard_docs) + 1, dtype=np.int64)
        np.cumsum(self._shard_docs, out=doc_bounds[1:])
        sizes = self._shard_sizes[keep]
        view.shard_names = [self.shard_names[i] for i in keep]
        view.shard_checksums = [self.shard_checksums[i] for i in keep]
        view.shard_domains = [name] * len(keep)
        view._shard_sizes = sizes
        view._shard_docs = self._shard_docs[keep]
        view._shard_starts = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(sizes, out=view._shard_starts[1:])
        # Re-base each kept shard's document offsets from the full set's layout onto the view's.
        view.doc_starts = np.concatenate(
            [self.doc_starts[doc_bounds[i] : doc_bounds[i + 1]] - self._shard_starts[i] + view._shard_starts[k]
             for k, i in enumerate(keep)]
        ) if keep else np.zeros(0, np.int64)  # fmt: skip
        view.num_tokens = int(sizes.sum())
        view.num_documents = int(view._shard_docs.sum())
        view._tokens = None
        view.selected_domain = name
        view._views = {}
        return view

    def _check_shard(self, shard: dict[str, Any]) -> np.ndarray:
        """Validate one shard's files against the index; return its document offsets."""
        name, n_tok, n_doc = shard["name"], int(shard["num_tokens"]), int(shard["num_documents"])
        tok_path, doc_path = self.path / f"{name}.tokens.npy", self.path / f"{name}.docs.npy"
        for p in (tok_path, doc_path):
            if not p.is_file():
                raise DataError(f"{self.path}: shard {name} is missing {p.name}; {_REBUILD}")
        try:
            tokens = np.load(tok_path, mmap_mode="r")
            docs = np.load(doc_path)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: shard {name} is unreadable ({e}); {_REBUILD}") from None
        if tokens.dtype != DTYPE or tokens.shape != (n_tok,):
            raise DataError(
                f"{self.path}: shard {name} has {tokens.shape} {tokens.dtype} tokens, "
                f"index says ({n_tok},) uint32; {_REBUILD}"
            )
        if docs.dtype != np.uint64 or docs.shape != (n_doc,):
            raise DataError(
                f"{self.path}: shard {name} has {docs.shape[0]} document offsets, index says {n_doc}; {_REBUILD}"
            )
        if n_doc and (docs[0] != 0 or np.any(np.diff(docs.astype(np.int64)) <= 0) or int(docs[-1]) >= n_tok):
            raise DataError(f"{self.path}: shard {name} has invalid document offsets; {_REBUILD}")
        return docs

    # ------------------------------------------------------------ verification
    @property
    def has_checksums(self) -> bool:
        """False for an index written before shards carried checksums (nothing to compare)."""
        return all(c is not None for c in self.shard_checksums)

    def verify_shard(self, i: int, tokens: np.ndarray | None = None) -> None:
        """Check shard ``i`` in full: its files' checksums (when the index has them) and its token range.

        One sequential read of the shard's files plus a vectorised max over its tokens.
        Raises a one-line ``DataError`` naming the file.
        """
        name = self.shard_names[i]
        tok_path, doc_path = self.path / f"{name}.tokens.npy", self.path / f"{name}.docs.npy"
        expected = self.shard_checksums[i]
        if expected is not None:
            for kind, path in (("tokens", tok_path), ("docs", doc_path)):
                want = expected.get(kind)
                if want is None:
                    continue
                try:
                    got = file_checksum(path)
                except OSError as e:
                    raise DataError(f"{path}: unreadable ({e.strerror or e}); {_REBUILD}") from None
                if got != want:
                    raise DataError(
                        f"{path}: checksum mismatch ({got}, index says {want}): the file is corrupt or changed "
                        f"since it was built; restore it or {_REBUILD}"
                    )
        if tokens is None:
            tokens = np.load(tok_path, mmap_mode="r")
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            bad = int(tokens.max())
            raise DataError(
                f"{tok_path}: token id {bad} is outside the vocabulary of {self.vocab_size} ids (index vocab_size): "
                f"the shard is corrupt or was built with another tokenizer; {_REBUILD}"
            )

    def _open_shard(self, i: int) -> np.ndarray:
        path = self.path / f"{self.shard_names[i]}.tokens.npy"
        tokens = np.load(path, mmap_mode="r")
        if self.verify:
            st = os.stat(path)
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
            if key not in _VERIFIED:
                self.verify_shard(i, tokens)
                _VERIFIED.add(key)
        return tokens

    # The memory maps are opened lazily and not pickled: a DataLoader worker gets a
    # copy of the dataset, and pickling a memmap would copy the whole array. The first
    # open of a shard in a process verifies it (``verify_shard``), once per process.
    @property
    def shards(self) -> list[np.ndarray]:
        if self._tokens is None:
            self._tokens = [self._open_shard(i) for i in range(len(self.shard_names))]
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None
        state["_views"] = {}
        return state

    def __repr__(self) -> str:
        domain = f", domain={self.selected_domain!r}" if self.selected_domain is not None else ""
        return (f"ShardSet({str(self.path)!r}{domain}, num_tokens={self.num_tokens}, "
                f"num_documents={self.num_documents})")

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (``[bos] + tokens + [eos]``) as int64."""
        start = int(self.doc_starts[i])
        end = int(self.doc_starts[i + 1]) if i + 1 < self.num_documents else self.num_tokens
        return self.window(start, end - start)[0]

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and document ids of global offsets ``[start, start + length)``.

        Offset ``o`` reads token ``o % num_tokens`` (the set repeats endlessly); the
        document id of a token of document ``d`` in epoch ``e = o // num_tokens`` is
        ``e * num_documents + d``, unique per (epoch, document). Both arrays are int64.
        """
        start, length = int(start), int(length)
        if start < 0 or length < 0:
            raise ValueError(f"window(start={start}, length={length}): both must be >= 0")
        if self.num_tokens == 0:
            raise DataError(f"{self.path} is an empty shard set (0 tokens); rebuild it from a corpus with documents")
        n = self.num_tokens
        tokens = np.empty(length, dtype=np.int64)
        # Copy contiguous runs that lie inside one shard and one epoch: a handful of
        # slices per window, no per-token Python work.
        pos, end = start, start + length
        shards, bounds = self.shards, self._shard_starts
        while pos < end:
            off = pos % n
            s = int(np.searchsorted(bounds, off, side="right")) - 1
            take = min(end - pos, int(bounds[s + 1]) - off)
            local = off - int(bounds[s])
            tokens[pos - start : pos - start + take] = shards[s][local : local + take]
            pos += take
        offsets = np.arange(start, end, dtype=np.int64)
        epoch, off = np.divmod(offsets, n)
        doc_ids = epoch * self.num_documents + (np.searchsorted(self.doc_starts, off, side="right") - 1)
        return tokens, doc_ids
