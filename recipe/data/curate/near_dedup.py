"""Stage 4: exact and near-duplicate documents (exact hash, then MinHash + LSH).

The fit is a fold over runs of documents (``fit_in_parts``). ``fit_part`` turns a run into
a ``SignaturePart``: each text's 64-bit hash, MinHash signature, has-shingles flag and LSH
band keys. ``fit_merge`` appends the parts, in stream order, to two memory-mapped files in
the scratch folder (signatures, keys) and clusters: the first of equal hashes is kept
(``exact_duplicate`` for the rest); the other documents are clustered by LSH with
verification (``recipe.data.curate.minhash``) and each cluster keeps its first document
(``near_duplicate`` for the rest); a dropped copy names the kept document's id
(``duplicate_of``, for the fate log).

Where it runs: a local ``fit`` computes the parts over chunks of documents in worker
processes (``signature_parts``, a fork pool of ``workers``); under ``executor: ray`` the
parts are computed in the Ray tasks that already hold the documents. The clustering's
band-by-band candidate pairs and their verification are calls of ``Context.map`` (Ray
tasks under ``ray``, in this process under ``local``); the union-find over the verified
pairs, and the positional second pass, run on the driver. Memory on the driver: the
hashes and flags, the distinct candidate pairs, and one band of keys per task; the
signatures stay on disk (memory-mapped; a Ray run puts them in the object store once).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from recipe.data.curate.minhash import MinHasher, band_keys, lsh_clusters, threshold_of
from recipe.data.curate.record import Doc, doc_id, text_hash64
from recipe.data.curate.stage import Stage, register
from recipe.errors import ConfigError

__all__ = ["NearDedup", "SignaturePart", "pool_context", "signature_parts"]

_KEEP, _EXACT, _NEAR = 0, 1, 2


class SignaturePart(NamedTuple):
    """What the near-dedup fit needs of a run of ``n`` documents."""

    hashes: np.ndarray  # (n,) uint64: the exact text hash
    sigs: np.ndarray  # (n, num_perm) uint32: MinHash signatures
    has: np.ndarray  # (n,) bool: the text has a shingle (a text without words takes no part in LSH)
    keys: np.ndarray  # (n, bands) uint64: LSH band keys


@lru_cache(maxsize=4)
def _hasher(num_perm: int, ngram: int, seed: int) -> MinHasher:
    return MinHasher(num_perm=num_perm, ngram=ngram, seed=seed)


def _signature_task(args: tuple) -> SignaturePart:
    texts, num_perm, ngram, seed, bands, rows = args
    sig, has = _hasher(num_perm, ngram, seed).signatures(texts)
    hashes = np.fromiter((text_hash64(t) for t in texts), dtype=np.uint64, count=len(texts))
    return SignaturePart(hashes, sig, has, band_keys(sig, bands, rows))


def pool_context() -> mp.context.BaseContext:
    """fork where it exists: workers start in milliseconds and import nothing again."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)


def signature_parts(chunks: Iterator[list[str]], workers: int, params: tuple) -> Iterator[SignaturePart]:
    """The ``SignaturePart`` of each chunk of texts, in order, over ``workers`` processes.
    ``params``: ``(num_perm, ngram, seed, bands, rows)``."""
    tasks = ((texts, *params) for texts in chunks)
    if workers <= 1:
        yield from map(_signature_task, tasks)
        return
    with pool_context().Pool(workers) as pool:
        yield from pool.imap(_signature_task, tasks, chunksize=1)


@register
class NearDedup(Stage):
    """Drop exact duplicates, then near-duplicates (word ``ngram`` shingles, MinHash, LSH).

    Args:
        ngram: words per shingle (5).
        num_perm: MinHash permutations; ``bands * rows`` of them form the LSH bands.
        bands, rows: LSH banding; the S-curve midpoint is about (1/bands)**(1/rows) (0.61 for 20 x 6:
            a low one finds more candidates, and the verification at ``threshold`` removes the false ones).
        threshold: estimated Jaccard similarity a candidate pair needs to count as duplicate
            (null: every band collision counts, as plain LSH).
        exact: drop exact duplicates (equal text) first.
        chunk_documents: documents per worker process task (local fit).
        seed: the permutations' seed (fixed: reruns give the same clusters).
    """

    name = "near_dedup"
    needs_fit = True
    fit_in_parts = True  # the signatures of a run are computed where the run is; the clustering comes after

    def __init__(self, ngram: int = 5, num_perm: int = 128, bands: int = 20, rows: int = 6,
                 threshold: float | None = 0.75, exact: bool = True, chunk_documents: int = 1000, seed: int = 1,
                 **kw) -> None:  # fmt: skip
        super().__init__(**kw)
        if bands * rows > num_perm:
            raise ConfigError(f"near_dedup: bands x rows = {bands * rows} exceeds num_perm {num_perm}; "
                              f"lower them or raise num_perm")  # fmt: skip
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ConfigError(f"near_dedup: threshold must be in (0, 1], got {threshold}")
        self.ngram, self.num_perm, self.bands, self.rows = ngram, num_perm, bands, rows
        self.threshold, self.exact, self.chunk_documents, self.seed = threshold, exact, chunk_documents, seed
        self.decision = np.zeros(0, np.int8)
        self.rep = np.zeros(0, np.int64)
        self._needed: set[int] = set()
        self._sources: dict[int, str] = {}
        self._pos = 0

    @property
    def _params(self) -> tuple:
        return self.num_perm, self.ngram, self.seed, self.bands, self.rows

    def _chunks(self, docs: Iterator[Doc]) -> Iterator[list[str]]:
        chunk: list[str] = []
        for doc in docs:
            chunk.append(doc.text)
            if len(chunk) >= self.chunk_documents:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def fit(self, docs: Iterator[Doc]) -> None:
        assert self.ctx is not None
        self.fit_merge(signature_parts(self._chunks(docs), self.ctx.workers, self._params))

    def fit_part(self, docs: list[Doc]) -> SignaturePart:
        """Hashes, signatures, has-shingles flags and band keys of a run of documents."""
        return _signature_task(([d.text for d in docs], *self._params))

    def fit_merge(self, parts: Iterable[SignaturePart]) -> None:
        """Write the parts to the scratch folder in stream order, then find exact and near duplicates."""
        assert self.ctx is not None
        work = self.ctx.work_dir
        sig_path, key_path = work / f"{self.label}.sig.u32", work / f"{self.label}.keys.u64"
        hash_parts: list[np.ndarray] = []
        has_parts: list[np.ndarray] = []
        with open(sig_path, "wb") as fs, open(key_path, "wb") as fk:
            for part in parts:
                fs.write(np.ascontiguousarray(part.sigs, dtype=np.uint32).tobytes())
                fk.write(np.ascontiguousarray(part.keys, dtype=np.uint64).tobytes())
                hash_parts.append(part.hashes)
                has_parts.append(part.has)
        try:
            n = sum(len(h) for h in hash_parts)
            decision = np.zeros(n, np.int8)
            rep = np.arange(n, dtype=np.int64)
            if n:
                h = np.concatenate(hash_parts).astype(np.uint64, copy=False)
                del hash_parts
                if self.exact:
                    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
                    rep = first[inverse].astype(np.int64)
                    decision[rep != np.arange(n)] = _EXACT
                active = np.concatenate(has_parts) & (decision == _KEEP)
                sigs = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, self.num_perm))
                keys = np.memmap(key_path, dtype=np.uint64, mode="r", shape=(n, self.bands))
                near = lsh_clusters(keys, sigs, active, self.threshold, tasks=self.ctx.map)
                del sigs, keys
                is_near = (near != np.arange(n)) & (decision == _KEEP)
                decision[is_near] = _NEAR
                rep[is_near] = near[is_near]
        finally:
            for p in (sig_path, key_path):
                os.remove(p)
        self.decision, self.rep = decision, rep
        self._needed = set(rep[decision != _KEEP].tolist())
        self.stats.notes.update(lsh_threshold=round(threshold_of(self.bands, self.rows), 3),
                                clusters_with_duplicates=len(self._needed))  # fmt: skip

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            pos, self._pos = self._pos, self._pos + 1
            if pos in self._needed:
                self._sources[pos] = doc.source
            kind = self.decision[pos]
            if kind == _KEEP:
                continue
            # The kept document comes first in the stream, so its source is known by now.
            kept = self._sources.get(int(self.rep[pos]))
            kept_id = None if kept is None else doc_id(kept)
            if kind == _EXACT:
                self.drop(doc, "exact_duplicate", f"same text as {kept}", duplicate_of=kept_id)
            elif kind == _NEAR:
                self.drop(doc, "near_duplicate", f"near-duplicate of {kept}", duplicate_of=kept_id)

    def skip(self, docs: list[Doc]) -> None:
        # A kept document that a later duplicate names still has to be known by its source.
        for doc in docs:
            if self._pos in self._needed:
                self._sources[self._pos] = doc.source
            self._pos += 1

    def finish(self) -> None:
        self.decision, self.rep, self._sources = np.zeros(0, np.int8), np.zeros(0, np.int64), {}
