"""The global dedup fits in parts: ``near_dedup``, ``line_dedup`` and ``url_dedup`` folded from runs of documents.

Unit checks without Ray: ``fit_merge`` over parts cut at arbitrary points (empty runs
included) decides as ``fit`` on the whole; the LSH clustering gives the same clusters
whatever runs its band tasks and in whatever order the edges come. One small Ray run:
with ``executor: ray`` both dedups (and ``url_dedup``) are fitted from the Ray tasks'
parts, the LSH bands and the line-dedup buckets go through Ray tasks, and the shards,
report and fate log equal a local run's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from recipe.data.curate.line_dedup import LineDedup
from recipe.data.curate.minhash import MinHasher, band_keys, first_of_components, lsh_clusters
from recipe.data.curate.near_dedup import NearDedup
from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Context
from recipe.data.curate.url_dedup import URL_PARTITIONS, UrlDedup

DEMO = Path(__file__).resolve().parents[1] / "configs" / "data" / "demo.yaml"
BANNER = ["Accept all cookies to continue browsing this website today",
          "Share this article on your social networks now"]


def corpus(n: int = 240, seed: int = 0) -> list[Doc]:
    """Documents with planted exact copies, near copies (a few words changed), repeated lines and empty texts."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(400)]
    base = [" ".join(rng.choices(words, k=120)) for _ in range(40)]
    texts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            texts.append(rng.choice(base))
        elif r < 0.4:
            ws = rng.choice(base).split()
            for k in rng.sample(range(len(ws)), 3):
                ws[k] = rng.choice(words)
            texts.append(" ".join(ws))
        elif r < 0.45:
            texts.append("")
        else:
            body = " ".join(rng.choices(words, k=60))
            texts.append("\n".join([body, *rng.sample(BANNER, rng.randint(0, 2)), f"Page {rng.randint(1, 9)} of 9"]))
    return [Doc(t, f"c.jsonl:{i}") for i, t in enumerate(texts)]


def runs(docs: list[Doc], seed: int) -> list[list[Doc]]:
    """``docs`` cut at random points, with empty runs in between (a Ray batch the stage does not apply to)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(docs)), 11))
    bounds = [0, *cuts, len(docs)]
    out = [docs[a:b] for a, b in zip(bounds, bounds[1:])]
    out.insert(3, [])
    return out + [[]]


@pytest.mark.parametrize("args", [{}, {"threshold": None}, {"exact": False}, {"chunk_documents": 7}])
def test_near_dedup_from_parts_equals_the_whole_fit(tmp_path, args):
    docs = corpus()
    whole, parted = NearDedup(**args), NearDedup(**args)
    whole.setup(Context(work_dir=tmp_path, workers=2))  # the local fit: a fork pool over chunks
    parted.setup(Context(work_dir=tmp_path))
    whole.fit(iter(docs))
    for seed in range(3):
        parted.fit_merge([parted.fit_part(run) for run in runs(docs, seed)])
        assert np.array_equal(parted.decision, whole.decision) and np.array_equal(parted.rep, whole.rep)
        assert parted.stats.notes == whole.stats.notes
    kinds = np.bincount(whole.decision, minlength=3)
    assert kinds[2] > 10 and (kinds[1] > 10 or not whole.exact)  # the planted copies were found
    assert not list(tmp_path.iterdir())  # the memory-mapped files are gone


@pytest.mark.parametrize("bucket_documents", [1, 13, 100, 240, 10_000])
def test_line_dedup_from_parts_equals_the_whole_fit(bucket_documents):
    docs = corpus()
    whole, parted = (LineDedup(max_repeats=3, bucket_documents=bucket_documents) for _ in range(2))
    whole.fit(iter(docs))
    for seed in range(3):
        parted.fit_merge([parted.fit_part(run) for run in runs(docs, seed)])
        assert parted.frequent == whole.frequent and parted.stats.notes == whole.stats.notes
    assert len(whole.frequent) == -(-len(docs) // bucket_documents)
    if bucket_documents >= 100:  # the banner lines, and "page N of 9" with its digits normalized
        assert len(whole.frequent[0]) == 3
    empty = LineDedup()
    empty.fit(iter([]))
    assert empty.frequent == [set()]  # one bucket even without input, as the second pass expects


def test_url_dedup_shuffle_by_url_equals_the_whole_fit():
    rng = random.Random(1)
    dates = ["2024-01-02", None, "2024-03-01", "garbage", 20240101, "", 1_700_000_000]
    docs = [Doc(f"text {i}", f"u.jsonl:{i}", url=f"https://x.org/{rng.randrange(50)}" if i % 9 else None,
                date=rng.choice(dates)) for i in range(400)]  # fmt: skip
    whole = UrlDedup()
    whole.fit(iter(docs))
    folds = []
    for seed in range(3):
        parted = UrlDedup()
        parted.setup(Context(work_dir=Path("."), map=lambda fn, items: (folds.append(1), map(fn, items))[1]))
        parted.fit_merge([parted.fit_part(run) for run in runs(docs, seed)])
        assert parted.best == whole.best and len(whole.best) == 50  # ties: the first of the newest, as one fit
        assert parted.stats.counters == whole.stats.counters and parted.stats.notes == whole.stats.notes
    assert len(folds) == 3 and URL_PARTITIONS > 1


def test_lsh_clusters_band_tasks_and_edge_order_do_not_matter():
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, 60, 80)) for _ in range(120)]
    texts += [t.replace("w1 ", "w2 ", 1) for t in texts[:40]]  # near copies
    sig, has = MinHasher(num_perm=64).signatures(texts)
    keys = band_keys(sig, 16, 4)
    calls = []

    def ordered_map(fn, items):  # as a parallel map would: every item its own call, results in order
        items = list(items)
        calls.append((fn.func.__name__, len(items)))
        return iter([fn(item) for item in items])

    for threshold in (None, 0.8):
        rep = lsh_clusters(keys, sig, has, threshold)
        assert np.array_equal(lsh_clusters(keys, sig, has, threshold, tasks=ordered_map), rep)
        assert (rep[120:] < 120).sum() >= 35 and (rep <= np.arange(len(rep))).all()
    assert ("band_candidates", 16) in calls and "similar_pairs" in {name for name, _ in calls}
    edges = np.array([[5, 9], [9, 2], [7, 8], [3, 8], [0, 1]])
    for order in (edges, edges[::-1], edges[[2, 0, 4, 1, 3]]):
        assert first_of_components(10, order).tolist() == [0, 0, 2, 3, 4, 2, 6, 3, 3, 2]


# -- one small run under Ray


@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory):
    from recipe.data.curate.pipeline import curate, load_config
    from recipe.data.curate.ray_map import RayMap
    from recipe.data.curate.synthetic import write_web_corpus

    d = tmp_path_factory.mktemp("fits")
    write_web_corpus(d / "raw" / "web.jsonl", seed=0)
    write_web_corpus(d / "raw" / "web2.jsonl", seed=1)
    stages = [
        {"name": "clean"},
        {"name": "near_dedup", "args": {"bands": 16, "rows": 4, "num_perm": 64}},
        {"name": "domains"},
        {"name": "line_dedup", "args": {"max_repeats": 3, "bucket_documents": 60}},  # several buckets
        {"name": "blocklist"},
        {"name": "url_dedup"},
        {"name": "pack", "args": {"weights": None, "total_tokens": 40_000, "val_documents": 2}},
    ]
    called: list[str] = []
    real_call = RayMap.__call__

    def counting_call(self, fn, items):
        called.append(getattr(fn, "func", fn).__name__)
        return real_call(self, fn, items)

    RayMap.__call__ = counting_call
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        out = {}
        for executor in ("local", "ray"):
            cfg = load_config(DEMO, input=[str(d / "raw")], output=str(d / executor), workers=2, executor=executor)
            cfg.demo, cfg.stages, cfg.batch_documents = None, stages, 16
            out[executor] = (d / executor, curate(cfg, log=lambda s: None, progress=False))
    finally:
        ray.shutdown()
        RayMap.__call__ = real_call
    return out, called


def test_ray_fits_the_dedups_from_parts_and_matches_local(ray_runs):
    out, called = ray_runs
    (local, local_report), (remote, remote_report) = out["local"], out["ray"]
    assert remote_report["executor"]["remote_fits"] == ["near_dedup", "line_dedup", "url_dedup"]
    assert called == ["band_candidates", "similar_pairs", "frequent_hashes", "newest_per_url"]  # Ray tasks each

    def strip(report):
        return [{k: v for k, v in s.items() if k != "seconds"} for s in report["stages"]]

    assert strip(local_report) == strip(remote_report)
    by_stage = {s["name"]: s for s in local_report["stages"]}
    assert by_stage["near_dedup"]["documents_dropped"] > 5 and by_stage["line_dedup"]["notes"]["buckets"] > 2
    assert by_stage["line_dedup"]["counters"].get("lines_removed", 0) > 0
    assert pq.read_table(local / "report" / "fates.parquet").to_pylist() == \
        pq.read_table(remote / "report" / "fates.parquet").to_pylist()  # fmt: skip
    for split in ("train", "val"):
        a = {p.name: p.read_bytes() for p in (local / split).iterdir() if p.name != "index.json"}
        b = {p.name: p.read_bytes() for p in (remote / split).iterdir() if p.name != "index.json"}
        assert a == b and a
        ia, ib = (json.loads((root / split / "index.json").read_text()) for root in (local, remote))
        assert ia["shards"] == ib["shards"]
