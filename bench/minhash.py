"""Near-duplicate detection throughput and recall: our numpy MinHash + LSH vs datasketch.

The corpus is real text (the demo corpus's prose and code, cut into ~250-word
documents) plus planted near-duplicates: copies of random documents with 0.5-5% of
their words replaced, so their word-5-gram Jaccard similarity to the original spans
about 0.6-0.97 (computed exactly here). Both methods do a full streaming dedup with
128 permutations of word 5-grams: datasketch with ``MinHash.update_batch`` and a
``MinHashLSH`` (query, insert when new); ours with ``recipe.data.curate.minhash``
(signatures over worker processes, band keys, verified LSH clustering). Recall is
the share of planted copies flagged as duplicates, overall and among those with true
Jaccard >= the threshold; "other flagged" counts base documents flagged (the demo
corpus has a few natural duplicates, e.g. two editions of the same poems).

    .venv/bin/pip install datasketch     # or: pip install -e ".[bench]"
    .venv/bin/python bench/minhash.py [--docs 6000] [--dups 2000] [--workers 2] [--threshold 0.75]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from recipe.data.curate.minhash import lsh_clusters
from recipe.data.curate.near_dedup import signature_parts
from recipe.data.demo import build_demo_corpus

WORD = re.compile(r"\w+")


def corpus(n_docs: int, n_dups: int, seed: int = 0) -> tuple[list[str], list[int], list[float]]:
    """Base documents + planted copies; returns (texts, index of each copy's original, true Jaccard)."""
    path = Path("data/demo/corpus/demo.jsonl")
    if not path.is_file():
        path = build_demo_corpus(Path(tempfile.mkdtemp()) / "corpus", log=lambda s: None)
    base: list[str] = []
    seen: set[str] = set()
    for line in path.open(encoding="utf-8"):
        words = json.loads(line)["text"].split()  # whitespace runs (code indentation) become one space
        for i in range(0, len(words) - 150, 250):
            piece = " ".join(words[i : i + 250])
            if piece not in seen and len(WORD.findall(piece)) >= 150:
                seen.add(piece)
                base.append(piece)
    rng = random.Random(seed)
    rng.shuffle(base)
    base = base[:n_docs]
    vocab = sorted({w for t in base[:500] for w in t.split(" ")})
    originals, jaccards, copies = [], [], []
    for _ in range(n_dups):
        j = rng.randrange(len(base))
        ws = base[j].split(" ")
        for k in rng.sample(range(len(ws)), max(1, int(len(ws) * rng.uniform(0.005, 0.05)))):
            ws[k] = rng.choice(vocab)
        copies.append(" ".join(ws))
        originals.append(j)
        jaccards.append(jaccard(base[j], copies[-1]))
    return base + copies, originals, jaccards


def shingles(text: str) -> set[tuple[str, ...]]:
    w = WORD.findall(text.lower())
    return {tuple(w[i : i + 5]) for i in range(max(len(w) - 4, 1))}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def ours(texts: list[str], workers: int, threshold: float, bands: int = 20, rows: int = 6) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    chunks = (texts[i : i + 1000] for i in range(0, len(texts), 1000))
    parts = list(signature_parts(chunks, workers, (128, 5, 1, bands, rows)))
    sig, active, key = (np.concatenate([getattr(p, f) for p in parts]) for f in ("sigs", "has", "keys"))
    rep = lsh_clusters(key, sig, active, threshold)
    return rep != np.arange(len(texts)), time.perf_counter() - t0


def datasketch_dedup(texts: list[str], threshold: float) -> tuple[np.ndarray, float, tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    dup = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        m = MinHash(num_perm=128)
        m.update_batch([" ".join(s).encode("utf-8") for s in shingles(text)])
        if lsh.query(m):
            dup[i] = True
        else:
            lsh.insert(str(i), m)
    return dup, time.perf_counter() - t0, (lsh.b, lsh.r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=6000)
    ap.add_argument("--dups", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=0.75)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    texts, originals, jacc = corpus(args.docs, args.dups)
    n_base = len(texts) - len(originals)
    jacc = np.array(jacc)
    above = jacc >= args.threshold
    words = sum(len(t.split()) for t in texts)
    print(f"corpus: {n_base:,} documents + {len(originals):,} planted near-duplicates, {words:,} words; "
          f"true Jaccard of the copies {jacc.min():.2f}..{jacc.max():.2f}, {above.sum():,} >= {args.threshold}")
    results = {}
    runs = [("ours, 1 process", lambda: ours(texts, 1, args.threshold)),
            (f"ours, {args.workers} processes", lambda: ours(texts, args.workers, args.threshold)),
            ("datasketch", lambda: datasketch_dedup(texts, args.threshold)[:2])]  # fmt: skip
    print("ours: 20 bands x 6 rows, candidates verified at estimated Jaccard >= threshold; datasketch: MinHashLSH's "
          "own bands/rows for the threshold, no verification")
    for name, run in runs:
        flagged, seconds = run()
        planted = flagged[n_base:]
        results[name] = {
            "docs_per_s": round(len(texts) / seconds, 1), "seconds": round(seconds, 2),
            "recall": round(float(planted.mean()), 4), "recall_at_threshold": round(float(planted[above].mean()), 4),
            "other_flagged": int(flagged[:n_base].sum()),
        }  # fmt: skip
        r = results[name]
        print(f"{name:<22} {r['docs_per_s']:>9,.0f} docs/s  ({r['seconds']:.2f} s)  recall {r['recall']:.3f}  "
              f"recall at J>={args.threshold} {r['recall_at_threshold']:.3f}  other flagged {r['other_flagged']}")
    base = results["datasketch"]["docs_per_s"]
    for name in results:
        if name != "datasketch":
            print(f"speed-up of {name} over datasketch: {results[name]['docs_per_s'] / base:.2f}x")
    if args.json:
        ours_r, theirs = results[f"ours, {args.workers} processes"], results["datasketch"]
        speedup = ours_r["docs_per_s"] / theirs["docs_per_s"]
        results["headline"] = [
            {"name": f"ours ({args.workers} processes) / datasketch docs/s", "value": speedup, "unit": "x",
             "target": ">= 2", "met": speedup >= 2},
            {"name": f"recall at J>={args.threshold}, ours", "value": ours_r["recall_at_threshold"], "unit": "",
             "target": f">= {theirs['recall_at_threshold']} (datasketch)",
             "met": ours_r["recall_at_threshold"] >= theirs["recall_at_threshold"]},
        ]
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
