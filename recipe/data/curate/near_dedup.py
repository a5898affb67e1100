"""Stage 4: exact and near-duplicate documents (exact hash, then MinHash + LSH).

First pass: a 64-bit hash of each text, and (in worker processes, over chunks of
documents) its MinHash signature and LSH band keys, streamed to two files in the
scratch folder. Then: the first of equal hashes is kept (``exact_duplicate`` for the
rest); the other documents are clustered by LSH with verification
(``recipe.data.curate.minhash``) and each cluster keeps its first document
(``near_duplicate`` for the rest); a dropped copy names the kept document's id
(``duplicate_of``, for the fate log). Memory: one band of keys and the candidate pairs;
the signatures stay on disk (memory-mapped).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from functools import lru_cache

import numpy as np

from recipe.data.curate.minhash import MinHasher, band_keys, lsh_clusters, threshold_of
from recipe.data.curate.record import Doc, doc_id, text_hash64
from recipe.data.curate.stage import Stage, register
from recipe.errors import ConfigError

__all__ = ["NearDedup", "pool_context", "signature_chunks"]

_KEEP, _EXACT, _NEAR = 0, 1, 2


@lru_cache(maxsize=4)
def _hasher(num_perm: int, ngram: int, seed: int) -> MinHasher:
    return MinHasher(num_perm=num_perm, ngram=ngram, seed=seed)


def _signature_task(args: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    texts, num_perm, ngram, seed, bands, rows = args
    sig, has = _hasher(num_perm, ngram, seed).signatures(texts)
    return sig, has, band_keys(sig, bands, rows)


def pool_context() -> mp.context.BaseContext:
    """fork where it exists: workers start in milliseconds and import nothing again."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)


def signature_chunks(chunks: Iterator[list[str]], workers: int, params: tuple) -> Iterator[tuple]:
    """``(signatures, has_shingles, band keys)`` of each chunk of texts, in order, over ``workers`` processes."""
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
        chunk_documents: documents per worker task.
        seed: the permutations' seed (fixed: reruns give the same clusters).
    """

    name = "near_dedup"
    needs_fit = True

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

    def _chunks(self, docs: Iterator[Doc], hashes: list[int]) -> Iterator[list[str]]:
        chunk: list[str] = []
        for doc in docs:
            hashes.append(text_hash64(doc.text))
            chunk.append(doc.text)
            if len(chunk) >= self.chunk_documents:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def fit(self, docs: Iterator[Doc]) -> None:
        assert self.ctx is not None
        work = self.ctx.work_dir
        sig_path, key_path = work / f"{self.label}.sig.u32", work / f"{self.label}.keys.u64"
        hashes: list[int] = []
        has_parts: list[np.ndarray] = []
        params = (self.num_perm, self.ngram, self.seed, self.bands, self.rows)
        with open(sig_path, "wb") as fs, open(key_path, "wb") as fk:
            for sig, has, keys in signature_chunks(self._chunks(docs, hashes), self.ctx.workers, params):
                fs.write(sig.tobytes())
                fk.write(keys.tobytes())
                has_parts.append(has)
        n = len(hashes)
        decision = np.zeros(n, np.int8)
        rep = np.arange(n, dtype=np.int64)
        if n:
            h = np.array(hashes, dtype=np.uint64)
            if self.exact:
                _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
                rep = first[inverse].astype(np.int64)
                decision[rep != np.arange(n)] = _EXACT
            active = np.concatenate(has_parts) & (decision == _KEEP)
            sigs = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, self.num_perm))
            keys = np.memmap(key_path, dtype=np.uint64, mode="r", shape=(n, self.bands))
            near = lsh_clusters(keys, sigs, active, self.threshold)
            del sigs, keys
            is_near = (near != np.arange(n)) & (decision == _KEEP)
            decision[is_near] = _NEAR
            rep[is_near] = near[is_near]
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

    def finish(self) -> None:
        self.decision, self.rep, self._sources = np.zeros(0, np.int8), np.zeros(0, np.int64), {}
