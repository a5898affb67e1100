"""Tokenize-and-pack throughput of the curation's pack stage vs tiktoken's encode_ordinary_batch alone.

Both encode the same documents (the demo corpus, ~17M characters) with the Llama 3
tokenizer on the same number of threads. The baseline is only
``encoding.encode_ordinary_batch(texts, num_threads=N)``; ours is the whole ``pack``
stage of ``recipe data curate``: encode with BOS/EOS, spill per bucket, choose the
mix, split train/val and write the shard sets. Runs alternate; the best of each and
the median ratio of back-to-back pairs are printed, so machine noise hits both alike.

    .venv/bin/python bench/tokenize_pack.py [--threads 8] [--repeats 3] [--json out.json]

(Not "tokenize.py": a script of that name in bench/ would shadow the standard library
module `tokenize` for every script run from this folder.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from recipe.data.curate.pack import Pack
from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Context
from recipe.data.demo import build_demo_corpus
from recipe.tokenizer import Tokenizer


def documents() -> list[Doc]:
    path = Path("data/demo/corpus/demo.jsonl")
    if not path.is_file():
        path = build_demo_corpus(Path(tempfile.mkdtemp()) / "corpus", log=lambda s: None)
    out = []
    for i, line in enumerate(path.open(encoding="utf-8")):
        rec = json.loads(line)
        out.append(Doc(rec["text"], f"demo:{i}", bucket={"prose": "general"}.get(rec["domain"], rec["domain"])))
    return out


def baseline(tok: Tokenizer, texts: list[str], threads: int) -> float:
    t0 = time.perf_counter()
    tok._enc.encode_ordinary_batch(texts, num_threads=threads)
    return time.perf_counter() - t0


def pack(docs: list[Doc], threads: int, batch: int) -> tuple[float, int]:
    root = Path(tempfile.mkdtemp())
    (root / "work").mkdir()
    try:
        stage = Pack(threads=threads)  # the default mix: 50/25/17/8
        stage.setup(Context(work_dir=root / "work"))
        t0 = time.perf_counter()
        for i in range(0, len(docs), batch):
            stage.run_batch(docs[i : i + batch])
        summary = stage.write(root / "out", {})
        seconds = time.perf_counter() - t0
        return seconds, summary["shards"]["train"]["tokens"] + summary["shards"]["val"]["tokens"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256, help="documents per batch (the curation default)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    docs = documents()
    texts = [d.text for d in docs]
    tok = Tokenizer()
    n_tokens = sum(len(ids) for ids in tok._enc.encode_ordinary_batch(texts, num_threads=args.threads))
    chars = sum(map(len, texts))
    print(f"{len(docs):,} documents, {chars:,} characters, {n_tokens:,} tokens, {args.threads} threads")
    bases, packs = [], []
    for _ in range(args.repeats):
        bases.append(baseline(tok, texts, args.threads))
        seconds, written = pack(docs, args.threads, args.batch)
        packs.append(seconds)
    base_rate, pack_rate = n_tokens / min(bases), n_tokens / min(packs)
    paired = sorted(b / p for b, p in zip(bases, packs))
    print(f"tiktoken encode_ordinary_batch   {base_rate / 1e6:6.2f} M tokens/s (best {min(bases):.2f} s)")
    print(f"pack stage (tokenize + mix + shards) {pack_rate / 1e6:6.2f} M tokens/s (best {min(packs):.2f} s; "
          f"{written:,} tokens written after the default mix)")
    print(f"ratio of the best runs: {pack_rate / base_rate:.2f}x; median of the {len(paired)} back-to-back pairs: "
          f"{paired[len(paired) // 2]:.2f}x (pairs: {', '.join(f'{r:.2f}' for r in paired)})")
    if args.json:
        ratio = pack_rate / base_rate
        result = {"bench": "tokenize_pack", "documents": len(docs), "characters": chars, "tokens": n_tokens,
                  "threads": args.threads, "baseline_tokens_per_s": base_rate, "pack_tokens_per_s": pack_rate,
                  "ratio_best": ratio, "ratio_pairs": paired, "tokens_written": written,
                  "headline": [{"name": "pack stage / tiktoken encode tokens/s", "value": ratio, "unit": "x",
                                "target": ">= 0.9", "met": ratio >= 0.9}]}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
