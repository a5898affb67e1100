"""Curation throughput: ``executor: ray`` with 1 and 2 CPUs against ``executor: local``, in one run.

The corpus is the demo's raw input (``data/curate-demo/raw``: stdlib code, prose, math and
the synthetic crawl with its planted problems) repeated to ``--docs`` documents. Every copy
after the first gets its own URLs (``?copy=k``) and has one word in eight swapped with
another word of the same document, so the copies are neither URL, exact nor near
duplicates (word 5-gram Jaccard about 0.35) and every stage has real work. Each run
curates the corpus with ``configs/data/demo.yaml``'s stages (the pack budget scaled with
the corpus) into its own folder; the shards of every run must be byte-identical.

Documents/s count the documents read over the whole ``curate`` call (Ray's in-process
start-up included). The ratios are against the local executor on one core (``workers: 1``:
no MinHash process pool either) measured in the same run; the scaling efficiency is
(Ray with 2 CPUs / Ray with 1 CPU) / 2. What runs where under Ray:
``recipe/data/curate/executors.py`` (reading, the clustering and packing stay on the
driver, so they bound the speed-up).

The projection: the single-core run's report gives each stage's seconds per MB of its
input (the pass that reads the input and the spills counts as ``read``: the wall time no
stage accounts for). Bytes, not documents, carry over to a web crawl, whose pages are
shorter than the demo's books and modules. Curating 15T tokens of output needs
15T x (bytes read / tokens available after filtering) bytes in; each stage sees its
measured share of them. Core-hours per stage = MB into the stage x seconds per MB / 3600.
It assumes a crawl whose mix of drops matches the demo's, and it counts compute only
(no storage or network).

    .venv/bin/python bench/curate_ray.py [--docs 20000] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

from recipe.data.curate.pipeline import curate, load_config, prepare_demo_inputs

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "data" / "demo.yaml"
WORD = re.compile(r"\S+")


def perturb(text: str, rng: random.Random) -> str:
    """Swap one word in eight with another word of the same text (whitespace kept)."""
    words = WORD.findall(text)
    if len(words) < 8:
        return text + f" {rng.randrange(10**9)}"

    def swap(m: re.Match) -> str:
        return words[rng.randrange(len(words))] if rng.random() < 0.125 else m.group(0)

    return WORD.sub(swap, text)


def build_corpus(raw: Path, out: Path, docs: int) -> int:
    """``docs`` input lines from the files in ``raw`` (copies perturbed); returns the count written."""
    # Bytes, not text: the crawl plants records with broken UTF-8, and they stay broken.
    lines = [line for f in sorted(raw.glob("*.jsonl")) for line in f.read_bytes().splitlines() if line]
    out.mkdir(parents=True)
    written = 0
    with open(out / "corpus.jsonl", "wb") as f:
        for copy in range(docs // len(lines) + 1):
            rng = random.Random(copy)
            for line in lines:
                if written == docs:
                    return written
                if copy:
                    try:
                        rec = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        rec = None  # a planted broken record stays broken
                    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                        rec["text"] = perturb(rec["text"], rng)
                        if isinstance(rec.get("url"), str) and rec["url"]:
                            rec["url"] = f"{rec['url']}{'&' if '?' in rec['url'] else '?'}copy={copy}"
                        line = json.dumps(rec, ensure_ascii=False).encode("utf-8", "surrogatepass")
                f.write(line + b"\n")
                written += 1
    return written


TARGET_TOKENS = 15e12  # the paper's pre-training corpus


def projection(report: dict, seconds: float) -> dict:
    """Core-hours per stage to curate ``TARGET_TOKENS`` tokens, from a one-core run's report."""
    stages = report["stages"]
    read_mb = stages[0]["bytes_in"] / 1e6
    available = sum(m["tokens"] for m in report["mix"].values())  # after every filter, before the mix samples
    target_mb = TARGET_TOKENS * read_mb / available
    rows = [{"stage": "read", "mb_in": read_mb, "seconds": seconds - sum(s["seconds"] for s in stages)}]
    rows += [{"stage": s["name"], "mb_in": s["bytes_in"] / 1e6, "seconds": s["seconds"]} for s in stages
             if s["name"] != "read"]  # fmt: skip
    for r in rows:
        r["s_per_mb"] = r["seconds"] / max(r["mb_in"], 1e-9)
        r["core_hours"] = target_mb * (r["mb_in"] / read_mb) * r["s_per_mb"] / 3600
    return {"bytes_per_available_token": round(read_mb * 1e6 / available, 3), "tb_to_read": round(target_mb / 1e6, 1),
            "stages": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            "core_hours": round(sum(r["core_hours"] for r in rows))}  # fmt: skip


def print_projection(p: dict) -> None:
    print(f"projection for {TARGET_TOKENS / 1e12:.0f}T tokens: {p['tb_to_read']:,} TB to read "
          f"({p['bytes_per_available_token']} bytes in per token out)")
    for r in sorted(p["stages"], key=lambda r: -r["core_hours"]):
        print(f"  {r['stage']:<14} {r['s_per_mb']:>8.3f} core-s/MB  {r['core_hours']:>14,.0f} core-hours")
    print(f"  {'total':<14} {'':>19} {p['core_hours']:>14,.0f} core-hours")


def run(corpus: Path, out: Path, executor: str, workers: int, total_tokens: int) -> dict:
    cfg = load_config(DEMO, input=[str(corpus)], output=str(out), workers=workers, executor=executor)
    cfg.demo = None
    stages = {s["name"]: s for s in cfg.stages}
    stages["pack"]["args"]["total_tokens"] = total_tokens
    t0 = time.perf_counter()
    report = curate(cfg, log=lambda s: None, progress=False)
    seconds = time.perf_counter() - t0
    return {"executor": executor, "workers": workers, "seconds": round(seconds, 2),
            "docs_per_s": round(report["documents_read"] / seconds, 1), "documents_read": report["documents_read"],
            "documents_written": report["documents_written"], "report": report}  # fmt: skip


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for split in ("train", "val")
            for p in sorted((out / split).glob("*.npy"))}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=20_000, help="documents in the scaled-up corpus")
    ap.add_argument("--quick", action="store_true", help="4,000 documents")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    docs = 4_000 if args.quick else args.docs
    demo = load_config(DEMO).demo or {}
    demo = {**demo, "dir": str(ROOT / demo.get("dir", "data/curate-demo"))}
    prepare_demo_inputs(demo, log=print)  # the raw inputs and the quality model's training files
    tmp = Path(tempfile.mkdtemp(prefix="curate-ray-"))
    try:
        n = build_corpus(Path(demo["dir"]) / "raw", tmp / "corpus", docs)
        # The demo packs 1.5M of its ~4,800 documents' tokens; keep that share.
        total_tokens = int(1_500_000 * n / 4_800)
        print(f"corpus: {n:,} documents ({(tmp / 'corpus' / 'corpus.jsonl').stat().st_size / 1e6:.0f} MB)")
        results = []
        for executor, workers in (("local", 1), ("ray", 1), ("ray", 2)):
            r = run(tmp / "corpus", tmp / f"out-{executor}-{workers}", executor, workers, total_tokens)
            results.append(r)
            print(f"{executor:<6} {workers} CPU(s): {r['docs_per_s']:>8,.1f} docs/s ({r['seconds']:.1f} s, "
                  f"{r['documents_written']:,} of {r['documents_read']:,} written)", flush=True)
        local, ray1, ray2 = results
        same = all(shard_bytes(tmp / f"out-{r['executor']}-{r['workers']}") == shard_bytes(tmp / "out-local-1")
                   for r in results[1:])  # fmt: skip
        efficiency = ray2["docs_per_s"] / ray1["docs_per_s"] / 2
        print(f"ray 1 CPU / local: {ray1['docs_per_s'] / local['docs_per_s']:.2f}x; "
              f"ray 2 CPUs / local: {ray2['docs_per_s'] / local['docs_per_s']:.2f}x; "
              f"scaling efficiency 1 -> 2 CPUs: {efficiency:.2f}; shards identical: {same}")
        projected = projection(local.pop("report"), local["seconds"])
        for r in results[1:]:
            del r["report"]
        print_projection(projected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        out = {"documents": n, "runs": results, "identical_shards": same, "projection": projected, "headline": [
            {"name": "ray (2 CPUs) / local docs/s", "value": round(ray2["docs_per_s"] / local["docs_per_s"], 3),
             "unit": "x", "target": "", "met": None},
            {"name": "ray scaling efficiency 1 -> 2 CPUs", "value": round(efficiency, 3), "unit": "",
             "target": "", "met": None},
            {"name": "shards identical across executors", "value": same, "unit": "", "target": "True",
             "met": same},
            {"name": f"projected core-hours for {TARGET_TOKENS / 1e12:.0f}T tokens", "value": projected["core_hours"],
             "unit": "core-h", "target": "", "met": None},
        ]}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if not same:
        raise SystemExit("curate_ray: the Ray runs wrote other shards than the local run; the executors disagree")


if __name__ == "__main__":
    main()
