"""MinHash signatures and LSH clustering, vectorized with numpy.

Signatures: every word n-gram of a batch of texts is hashed once (64-bit,
``recipe.data.curate.text``); permutation k maps a shingle x (its top 31 bits) to
``(a_k * x + b_k) mod p`` with the Mersenne prime p = 2**31 - 1 and ``a_k, b_k < p``,
computed for a block of permutations at once over all shingles of the batch
(``a_k * x + b_k`` stays below 2**62 in uint64, and each Mersenne reduction step is
a mask, a shift and an add), and ``np.minimum.reduceat`` takes each text's minimum.
A prime modulus far above the shingle range matters: with a small multiplier the map
would stay nearly linear and every permutation would pick the same minimum.

LSH: ``bands x rows`` signature values; a band's rows are folded into one 64-bit
key. Clustering has three steps. (1) Band by band, as independent tasks
(``band_candidates``): sort the band's keys, and every document whose key equals an
earlier one's is a candidate of the first document with that key and of its
predecessor in the sorted run. (2) The bands' pairs are gathered and made distinct, and
those whose estimated Jaccard similarity (the share of equal signature values) reaches
``threshold`` are kept, in runs of pairs as independent tasks (``similar_pairs``).
(3) A union-find over the kept pairs, where they were gathered, whose root is the
smallest (first-seen) index (``first_of_components``), so each cluster keeps its first
document whatever the order of the pairs. ``lsh_clusters`` runs the tasks of (1) and (2)
through an ordered map it is given (``Context.map``: Ray tasks under ``executor: ray``,
the builtin ``map`` here otherwise) and (3) in the caller. Memory of the caller: the
distinct candidate pairs; of a band task, one band of keys; the key and signature
matrices can be disk-backed ``np.memmap`` arrays (a Ray map puts them in the object store once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np

from recipe.data.curate.text import hash_words, mix64, ngram_hashes

__all__ = ["MinHasher", "ParallelMap", "band_candidates", "band_keys", "first_of_components", "lsh_clusters",
           "similar_pairs", "threshold_of"]

_U64 = np.uint64
MERSENNE = _U64((1 << 31) - 1)
_ROW_MULT = mix64(np.arange(1, 257, dtype=_U64) * _U64(0x9E3779B97F4A7C15)) | _U64(1)
_BLOCK_ELEMENTS = 1 << 18  # shingles x permutations per numpy step (2 MiB of uint64: fits the cache)
_GROUP_SHINGLES = 1 << 14
VERIFY_PAIRS = 1 << 18  # candidate pairs per verification task: 4 MiB of pairs sent, ~0.3 s of work
# An ordered map that may run the calls in parallel (``Context.map``); the builtin runs them here.
ParallelMap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


class MinHasher:
    """MinHash signatures of word ``ngram`` shingles with ``num_perm`` permutations."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = rng.integers(1, int(MERSENNE), num_perm, dtype=_U64)
        self.b = rng.integers(0, int(MERSENNE), num_perm, dtype=_U64)

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(signatures (n, num_perm) uint32, has_shingles (n,) bool)``; a text without words has none."""
        n = len(texts)
        sig = np.full((n, self.num_perm), np.iinfo(np.uint64).max, dtype=_U64)
        grams, owners = ngram_hashes(hash_words(texts), self.ngram)
        has = np.zeros(n, dtype=bool)
        if grams.size:
            x = grams >> _U64(33)  # 31 bits: a * x + b stays below 2**62
            starts = np.flatnonzero(np.diff(owners, prepend=-1))
            docs = owners[starts]
            has[docs] = True
            ends = np.append(starts[1:], grams.size)
            # Groups of whole documents of about _GROUP_SHINGLES shingles: each numpy step then
            # works on a block that stays in the CPU cache (6x faster than one pass over all).
            g0 = 0
            while g0 < starts.size:
                g1 = max(g0 + 1, int(np.searchsorted(starts, starts[g0] + _GROUP_SHINGLES, side="left")))
                s0, s1 = int(starts[g0]), int(ends[g1 - 1])
                xc, local = x[s0:s1], starts[g0:g1] - s0
                step = max(1, min(self.num_perm, _BLOCK_ELEMENTS // xc.size))
                for k0 in range(0, self.num_perm, step):
                    k1 = min(k0 + step, self.num_perm)
                    v = self.a[k0:k1, None] * xc
                    v += self.b[k0:k1, None]
                    for _ in range(2):  # x mod (2**31 - 1) = (x & p) + (x >> 31), twice from 62 bits
                        hi = v >> _U64(31)
                        v &= MERSENNE
                        v += hi
                    sig[docs[g0:g1], k0:k1] = np.minimum.reduceat(v, local, axis=1).T
                g0 = g1
        return sig.astype(np.uint32), has


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per band: ``(n, bands)`` uint64."""
    if bands * rows > sig.shape[1]:
        raise ValueError(f"bands x rows = {bands * rows} exceeds the {sig.shape[1]} permutations")
    n = sig.shape[0]
    s = sig[:, : bands * rows].reshape(n, bands, rows).astype(_U64)
    with np.errstate(over="ignore"):
        acc = (s * _ROW_MULT[:rows]).sum(axis=2, dtype=_U64)
        acc += np.arange(bands, dtype=_U64) * _U64(0xD6E8FEB86659FD93)
    return mix64(acc)


def threshold_of(bands: int, rows: int) -> float:
    """Jaccard similarity where the LSH S-curve crosses 1/2 (about (1/bands)**(1/rows))."""
    return (1.0 / bands) ** (1.0 / rows)


def _roots(parent: np.ndarray) -> np.ndarray:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def band_candidates(keys: np.ndarray, members: np.ndarray, band: int) -> np.ndarray:
    """The candidate pairs of one LSH band: ``(m, 2)`` int64 ``(earlier, later)`` document indices, unique.

    Among ``members`` (increasing indices into ``keys``), every document whose key in ``band``
    equals an earlier one's pairs with the first document with that key and with its
    predecessor in the run of that key. It reads one column of ``keys`` and nothing else, so
    the bands are independent tasks."""
    column = np.asarray(keys[members, band])
    order = np.argsort(column, kind="stable")  # within a key, documents stay in corpus order
    sorted_keys, docs = column[order], members[order]
    new_group = np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]])
    later = np.flatnonzero(~new_group)
    if not later.size:
        return np.zeros((0, 2), np.int64)
    first = np.maximum.accumulate(np.where(new_group, np.arange(docs.size), 0))[later]
    # The predecessor is the first document for the second of a run: that pair is there once already.
    pred = later[later - 1 != first]
    left = np.concatenate([docs[first], docs[pred - 1]])
    right = np.concatenate([docs[later], docs[pred]])
    return np.stack([left, right], axis=1)


def similar_pairs(sigs: np.ndarray, threshold: float, pairs: np.ndarray) -> np.ndarray:
    """Which ``pairs`` have a share of equal signature values of at least ``threshold`` (bool per pair)."""
    ok = np.zeros(len(pairs), dtype=bool)
    for s in range(0, len(pairs), 4096):  # bounded reads of the signature rows
        p = pairs[s : s + 4096]
        ok[s : s + 4096] = (np.asarray(sigs[p[:, 0]]) == np.asarray(sigs[p[:, 1]])).mean(axis=1) >= threshold
    return ok


def first_of_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """The smallest index of each document's connected component over the edges ``pairs``.

    Union-find by hooking, vectorized: each round hooks every root that has an edge to
    another component onto the smallest root across its edges, then compresses paths.
    A parent is never above its child, so the root of a component is its first document,
    whatever the order of the edges."""
    parent = np.arange(n, dtype=np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    while a.size:
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        if not a.size:
            break
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        parent = _roots(parent)
    return parent


def lsh_clusters(keys: np.ndarray, sigs: np.ndarray | None, active: np.ndarray, threshold: float | None = None,
                 tasks: ParallelMap = map) -> np.ndarray:  # fmt: skip
    """Cluster representative of every document (its own index when it is not a near-duplicate).

    ``keys`` (n, bands) and ``sigs`` (n, num_perm) may be memmaps; ``active`` marks the
    documents that take part. With ``threshold`` None every band collision merges
    (plain LSH); otherwise a candidate pair merges only when the share of equal
    signature values is at least ``threshold``. ``tasks`` is an ordered parallel map
    (``Context.map``): the candidate pairs of each band are one call, and the verification
    of each run of ``VERIFY_PAIRS`` distinct pairs another; the union-find runs here.
    """
    n = keys.shape[0]
    members = np.flatnonzero(active)
    if members.size < 2:
        return np.arange(n, dtype=np.int64)
    # Codes left * n + right (below 2**63 up to 3e9 documents): a cheap union of the bands' pairs,
    # which repeat across bands (a close copy collides in most of them).
    codes = np.zeros(0, np.int64)
    for pairs in tasks(partial(band_candidates, np.asarray(keys), members), range(keys.shape[1])):
        codes = np.union1d(codes, pairs[:, 0] * n + pairs[:, 1])
    pairs = np.stack([codes // n, codes % n], axis=1)
    del codes
    if threshold is not None and sigs is not None and len(pairs):
        runs = (pairs[s : s + VERIFY_PAIRS] for s in range(0, len(pairs), VERIFY_PAIRS))
        pairs = pairs[np.concatenate(list(tasks(partial(similar_pairs, np.asarray(sigs), threshold), runs)))]
    return first_of_components(n, pairs)
