"""Curation against datatrove on the same stages and input: documents/s and near-duplicate recall, in one run.

The stage set, on both sides, one core each (``workers: 1``; datatrove's local executor
with ``workers=1``):

  URL filter        our ``blocklist``                datatrove ``URLFilter``
  repetition        our ``repetition``               datatrove ``GopherRepetitionFilter``
  quality           our ``basic_filter``             datatrove ``GopherQualityFilter``
  near-dedup        our ``near_dedup``               datatrove ``MinhashDedupSignature`` /
                                                     ``Buckets`` (one task per bucket) /
                                                     ``Cluster`` / ``Filter``

and our pipeline ends with ``pack`` (required; no mixing, one tokenizer thread), which
tokenizes the survivors into shards, where datatrove writes them as JSONL. Both sides
use their own defaults for the Gopher thresholds (the same numbers; datatrove also asks
for two stop words) and the same URL block list: datatrove's integrated domain list
(about 4.5M domains) is given to our ``blocklist`` as its ``domains_file``; datatrove
also checks its banned (sub)words in the URL. MinHash: word 5-grams on both sides; we
use num_perm 128 of which bands 20 x rows 6 = 120 form the LSH bands, and keep a band
collision only when the estimated Jaccard is >= 0.75; datatrove uses num_buckets 20 x
hashes_per_bucket 6 = 120 hashes (64-bit sha1 shingle hashes: its default, xxhash,
needs xxhash < 4) and keeps every bucket collision.

The input is a random sample (in file order) of the demo's raw documents
(``data/curate-demo/raw``: code, prose, math, the synthetic crawl), scaled beyond their
~4,800 with ``bench/curate_ray.py``'s helpers (each repetition has its own URLs and one
word in eight swapped, so repetitions are not duplicates of each other); the records
with planted breakage (invalid JSON or UTF-8, no text) are left out, and every document
gets an ``id`` and a URL. Then ``--dups`` near-duplicates are appended, after all their
originals: a copy of a random original with 100+ words, with 0.5-2% of its words
replaced and a "mirrored from" header line, under a new id and URL; its word 5-gram
Jaccard with the original (lowercased ``\\w+`` words) is measured and kept >= 0.8.

Documents/s: input documents over the wall clock of the whole run (ours: the
``curate`` call; datatrove: its four executor runs, block lists loaded in both).
Recall: planted copies dropped as (near or exact) duplicates / planted copies that,
with their original, passed that side's filters and so reached its dedup. False drops:
other documents dropped as near-duplicates whose word 5-gram Jaccard with the document
kept for them (ours: ``duplicate_of`` in the fate log; datatrove: the kept member of
their MinHash cluster) is below 0.5, as a share of the other documents that reached
dedup. Which documents each side dropped and why comes from our fate log
(``report/fates.parquet``) and from datatrove's exclusion writers.

    .venv/bin/pip install datatrove orjson spacy tldextract fasteners pyahocorasick   # or: pip install -e ".[bench]"
    .venv/bin/python bench/curate_datatrove.py [--docs 5000] [--dups 500] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from curate_ray import build_corpus  # bench/ is on the path of a script run from it

from recipe.data.curate.pipeline import CurateConfig, curate, prepare_demo_inputs

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "data" / "curate-demo"
WORD = re.compile(r"\w+")
NGRAM = 5
BANDS, ROWS, NUM_PERM, THRESHOLD = 20, 6, 128, 0.75  # ours (the demo config's near_dedup)
MIN_JACCARD = 0.8  # every planted copy is at least this similar to its original
FALSE_DROP_JACCARD = 0.5  # a near-duplicate drop below this similarity to its kept document is a false one
DUP_REASONS = ("near_duplicate", "exact_duplicate")
DATATROVE_DEPS = ("datatrove", "orjson", "spacy", "tldextract", "fasteners", "ahocorasick")
INSTALL = ".venv/bin/pip install datatrove orjson spacy tldextract fasteners pyahocorasick"


def shingles(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The word ``n``-grams of ``text`` (lowercased ``\\w+`` words; a shorter text is one shingle)."""
    words = WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    """Word 5-gram Jaccard similarity of two texts."""
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / max(len(sa | sb), 1)


def near_copy(text: str, rng: random.Random, vocab: list[str], k: int) -> tuple[str, float]:
    """``text`` with 0.5-2% of its words (at least one) replaced and a header line, and its Jaccard with ``text``."""
    # Split on whitespace but keep it, so line structure (which the Gopher rules look at) stays.
    parts = re.split(r"(\s+)", text)
    words = [i for i, p in enumerate(parts) if p and not p.isspace()]
    for i in rng.sample(words, max(1, int(len(words) * rng.uniform(0.005, 0.02)))):
        parts[i] = rng.choice(vocab)
    copy = f"Mirrored from mirror{k}.copies.test on 2024-0{1 + k % 9}-1{k % 10}\n" + "".join(parts)
    return copy, jaccard(text, copy)


def _utf8(rec: dict[str, Any]) -> bool:
    """Whether the record can be written as UTF-8 (a planted lone surrogate cannot)."""
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def build_input(out: Path, docs: int, dups: int, seed: int = 0) -> dict[str, Any]:
    """Write ``out/corpus.jsonl``: ``docs - dups`` base documents, then ``dups`` planted near-duplicates.

    Returns the truth: every line's id and text (in file order) and, per planted copy
    (by line index), its original's line index and their Jaccard similarity."""
    prepare_demo_inputs({"dir": str(DEMO_DIR)}, print)
    raw, scaled = DEMO_DIR / "raw", out.parent / "scaled"
    lines = sum(1 for f in raw.glob("*.jsonl") for line in f.read_bytes().splitlines() if line)
    # The raw files are grouped by kind (code, prose, math, crawl): the base documents are a random
    # sample of the scaled corpus (in its order), so a small run still has every kind.
    build_corpus(raw, scaled, max(docs - dups + 100, lines))  # a few more: the broken records are left out
    pool: list[dict[str, Any]] = []
    for line in (scaled / "corpus.jsonl").read_bytes().splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a planted broken record: reading robustness is not measured here
        if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip() and _utf8(rec):
            pool.append(rec)
    rng = random.Random(seed)
    records = [pool[j] for j in sorted(rng.sample(range(len(pool)), min(docs - dups, len(pool))))]
    for i, rec in enumerate(records):
        rec["id"] = f"doc-{i}"
        # datatrove's URLFilter needs a URL on every document; the demo corpus has none.
        if not isinstance(rec.get("url"), str) or not rec["url"]:
            rec["url"] = f"https://{rec.get('domain') or 'text'}.corpus.test/doc/{i}"
    shutil.rmtree(scaled)
    vocab = sorted({w for rec in records[:300] for w in rec["text"].split()})
    candidates = [i for i, rec in enumerate(records) if len(rec["text"].split()) >= 100]
    copies: dict[int, tuple[int, float]] = {}
    for k in range(dups):
        similarity = 0.0
        while similarity < MIN_JACCARD:  # a short original can fall below it: take another
            orig = rng.choice(candidates)
            text, similarity = near_copy(records[orig]["text"], rng, vocab, k)
        copies[len(records)] = (orig, similarity)
        records.append({"text": text, "id": f"copy-{k}", "url": f"https://mirror{k}.copies.test/page/{k}"})
    out.mkdir(parents=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    return {"ids": [r["id"] for r in records], "texts": [r["text"] for r in records], "copies": copies}


def datatrove_domains() -> Path:
    """datatrove's integrated URL block list of domains, extracted into its assets cache on first use."""
    from datatrove.pipeline.filters import URLFilter
    from huggingface_hub import cached_assets_path

    URLFilter().download_data()  # extracts the lists once, not timed (every run below loads them again)
    return Path(cached_assets_path(library_name="datatrove", namespace="filters", subfolder="url_filter")) / "domains"


def run_ours(corpus: Path, out: Path, domains: Path) -> dict[str, Any]:
    """Curate ``corpus`` with our stages on one worker; the decisions from the fate log."""
    import pyarrow.parquet as pq

    cfg = CurateConfig(input=[str(corpus)], output=str(out), workers=1, fate_log=True, stages=[
        {"name": "blocklist", "args": {"domains_file": str(domains)}},
        {"name": "repetition", "args": {}},
        {"name": "basic_filter", "args": {}},
        {"name": "near_dedup", "args": {"ngram": NGRAM, "num_perm": NUM_PERM, "bands": BANDS, "rows": ROWS,
                                        "threshold": THRESHOLD}},
        # No mixing (every survivor is written) and one tokenizer thread: one core, like the rest.
        {"name": "pack", "args": {"weights": None, "threads": 1}},
    ])  # fmt: skip
    t0 = time.perf_counter()
    report = curate(cfg, log=lambda s: None, progress=False)
    seconds = time.perf_counter() - t0
    fates = pq.read_table(out / "report" / "fates.parquet").to_pylist()
    # source is "<file>:<line>", 1-based: line i is truth index i - 1.
    index = {row["doc_id"]: int(row["source"].rsplit(":", 1)[1]) - 1 for row in fates}
    filtered: set[int] = set()
    dropped_dup: dict[int, int | None] = {}
    for row in fates:
        i = index[row["doc_id"]]
        if row["decision"] == "dropped" and row["stage"] != "near_dedup" and row["stage"] != "pack":
            filtered.add(i)
        elif row["decision"] == "dropped" and row["reason"] in DUP_REASONS:
            dropped_dup[i] = index.get(row["duplicate_of"])
    stage_seconds = {s["name"]: s["seconds"] for s in report["stages"]}
    return {"seconds": seconds, "documents_read": report["documents_read"], "filtered": filtered,
            "dropped_dup": dropped_dup, "stage_seconds": stage_seconds}  # fmt: skip


def _read_jsonl(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.open(encoding="utf-8")]


def run_datatrove(corpus: Path, work: Path, truth: dict[str, Any]) -> dict[str, Any]:
    """The datatrove pipeline over ``corpus`` (local executor, one worker); decisions from its outputs."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, URLFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from tldextract import TLDExtract

    # 64-bit sha1 shingle hashes: datatrove's default xxhash path needs xxhash < 4 (it hashes str,
    # which xxhash 4 refuses), and this project's environment has xxhash 4.
    mh = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS,
                       hash_config=HashConfig(precision=64, hash_fc="sha1"))

    def writer(name: str) -> JsonlWriter:
        return JsonlWriter(str(work / name), compression=None)

    url_filter = URLFilter(exclusion_writer=writer("removed/url"))
    # The public suffix list shipped with tldextract: no attempt to download a newer one.
    url_filter.tldextractor = TLDExtract(suffix_list_urls=())
    # Filtering and signatures in one pass over the input (the filtered documents are written
    # for the final step, which must read them in the order the signatures numbered them).
    signatures = LocalPipelineExecutor([
        JsonlReader(str(corpus), glob_pattern="*.jsonl"),
        url_filter,
        GopherRepetitionFilter(exclusion_writer=writer("removed/repetition")),
        GopherQualityFilter(exclusion_writer=writer("removed/quality")),
        writer("filtered"),
        MinhashDedupSignature(output_folder=str(work / "signatures"), config=mh),
    ], tasks=1, workers=1, logging_dir=str(work / "logs/signatures"))  # fmt: skip
    buckets = LocalPipelineExecutor(
        [MinhashDedupBuckets(input_folder=str(work / "signatures"), output_folder=str(work / "buckets"), config=mh)],
        tasks=mh.num_buckets, workers=1, logging_dir=str(work / "logs/buckets"))  # fmt: skip
    cluster = LocalPipelineExecutor(
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove_ids"), config=mh,
                             save_cluster_id=True)],
        tasks=1, workers=1, logging_dir=str(work / "logs/clusters"))  # fmt: skip
    dedup = LocalPipelineExecutor([
        JsonlReader(str(work / "filtered"), glob_pattern="*.jsonl"),
        MinhashDedupFilter(input_folder=str(work / "remove_ids"), exclusion_writer=writer("removed/minhash"),
                           load_cluster_ids=True),
        writer("output"),
    ], tasks=1, workers=1, logging_dir=str(work / "logs/dedup"))  # fmt: skip
    # datatrove logs every step (and tqdm bars) to stderr: into a file, so the table stays readable.
    with open(work.parent / "datatrove.log", "w") as log, contextlib.redirect_stderr(log):
        t0 = time.perf_counter()
        for executor in (signatures, buckets, cluster, dedup):
            executor.run()
        seconds = time.perf_counter() - t0
        from loguru import logger

        logger.remove()  # its task sinks hold the redirected stream
    index = {doc_id: i for i, doc_id in enumerate(truth["ids"])}
    filtered = {index[d["id"]] for stage in ("url", "repetition", "quality")
                for d in _read_jsonl(work / "removed" / stage)}  # fmt: skip
    kept_in_cluster = {d["metadata"]["minhash_cluster_id"]: index[d["id"]] for d in _read_jsonl(work / "output")
                       if d["metadata"].get("minhash_cluster_id", -1) != -1}  # fmt: skip
    dropped_dup = {index[d["id"]]: kept_in_cluster.get(d["metadata"].get("minhash_cluster_id"))
                   for d in _read_jsonl(work / "removed" / "minhash")}  # fmt: skip
    return {"seconds": seconds, "documents_read": len(truth["ids"]), "filtered": filtered, "dropped_dup": dropped_dup}


def score(side: dict[str, Any], truth: dict[str, Any]) -> dict[str, Any]:
    """Recall on the planted copies and false near-duplicate drops among the other documents."""
    copies = truth["copies"]
    reached = [c for c, (orig, _) in copies.items() if c not in side["filtered"] and orig not in side["filtered"]]
    caught = sum(1 for c in reached if c in side["dropped_dup"])
    others = [i for i in range(len(truth["ids"])) if i not in copies and i not in side["filtered"]]
    texts = truth["texts"]
    other_drops = [(i, kept) for i, kept in side["dropped_dup"].items() if i not in copies]
    false = sum(1 for i, kept in other_drops if kept is None or jaccard(texts[i], texts[kept]) < FALSE_DROP_JACCARD)
    return {"docs_per_s": round(side["documents_read"] / side["seconds"], 1), "seconds": round(side["seconds"], 2),
            "filtered": len(side["filtered"]), "reached_dedup": len(others) + len(reached),
            "planted_reached": len(reached), "planted_caught": caught,
            "recall": round(caught / len(reached), 4) if reached else None,
            "other_dup_drops": len(other_drops), "false_drops": false,
            "false_drop_share": round(false / len(others), 5) if others else None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=5_000, help="input documents, planted copies included")
    ap.add_argument("--dups", type=int, default=None, help="planted near-duplicates (default: a tenth of --docs)")
    ap.add_argument("--quick", action="store_true", help="300 documents")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    missing = [m for m in DATATROVE_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"curate_datatrove: needs {', '.join(missing)}: {INSTALL}  (or pip install -e \".[bench]\")")
    docs = 300 if args.quick else args.docs
    dups = args.dups if args.dups is not None else docs // 10
    tmp = Path(tempfile.mkdtemp(prefix="curate-datatrove-"))
    try:
        truth = build_input(tmp / "corpus", docs, dups)
        sims = sorted(s for _, s in truth["copies"].values())
        print(f"input: {len(truth['ids']):,} documents, {dups:,} of them planted near-duplicates (word 5-gram "
              f"Jaccard with the original: min {sims[0]:.2f}, median {sims[len(sims) // 2]:.2f})", flush=True)
        domains = datatrove_domains()
        ours = score(raw_ours := run_ours(tmp / "corpus", tmp / "ours", domains), truth)
        print(f"ours done in {ours['seconds']:.1f} s", flush=True)
        theirs = score(run_datatrove(tmp / "corpus", tmp / "datatrove", truth), truth)
        print(f"datatrove done in {theirs['seconds']:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = ours["docs_per_s"] / theirs["docs_per_s"]
    minhash = {"ours": f"word {NGRAM}-grams, num_perm {NUM_PERM}, bands {BANDS} x rows {ROWS} = {BANDS * ROWS} "
                       f"used, estimated Jaccard >= {THRESHOLD} verified",
               "datatrove": f"word {NGRAM}-grams, num_buckets {BANDS} x hashes_per_bucket {ROWS} = {BANDS * ROWS} "
                            f"hashes (64-bit sha1), every bucket collision counts"}  # fmt: skip
    print(f"MinHash, ours:      {minhash['ours']}\nMinHash, datatrove: {minhash['datatrove']}")
    print(f"{'':<10}{'docs/s':>9}{'seconds':>9}{'filtered':>10}{'recall':>9}{'planted':>13}"
          f"{'false drops':>13}{'other dup drops':>17}")
    for name, r in (("ours", ours), ("datatrove", theirs)):
        planted = f"{r['planted_caught']}/{r['planted_reached']}"
        false = f"{r['false_drops']} ({r['false_drop_share'] or 0:.2%})"
        recall = float("nan") if r["recall"] is None else r["recall"]
        print(f"{name:<10}{r['docs_per_s']:>9,.1f}{r['seconds']:>9.1f}{r['filtered']:>10,}{recall:>9.3f}"
              f"{planted:>13}{false:>13}{r['other_dup_drops']:>17,}")
    print(f"ours / datatrove documents/s: {ratio:.2f}x (one core each; ours includes tokenizing into shards: "
          f"pack {raw_ours['stage_seconds'].get('pack', 0.0):.1f} s)")
    if args.json:
        out = {"documents": len(truth["ids"]), "planted": dups, "planted_jaccard_min": round(sims[0], 3),
               "minhash": minhash, "ours": ours, "datatrove": theirs, "ours_stage_seconds": raw_ours["stage_seconds"],
               "headline": [
                   {"name": "ours / datatrove docs/s (1 core)", "value": round(ratio, 3), "unit": "x", "target": "",
                    "met": None},
                   {"name": "near-dup recall, ours", "value": ours["recall"], "unit": "", "target": "", "met": None},
                   {"name": "near-dup recall, datatrove", "value": theirs["recall"], "unit": "", "target": "",
                    "met": None},
               ]}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
