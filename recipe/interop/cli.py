"""``recipe import``, ``recipe export`` and ``recipe generate``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from recipe.interop import InteropError

_IMPORT_DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16"}


def _size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB or 500MB")
    number, unit = float(match.group(1)), (match.group(2) or "b")
    power = "bkmgt".index(unit[0])
    return int(number * (1024 if "i" in unit else 1000) ** power)


def import_main(argv: list[str]) -> int:
    import torch

    parser = argparse.ArgumentParser(
        prog="recipe import", description="Meta or Hugging Face Llama 3 weights -> a recipe weights directory "
        "(a DCP checkpoint that --model.init_weights_path loads under any parallel layout)")
    parser.add_argument("format", choices=["meta", "hf"], help="meta: params.json + consolidated.*.pth; "
                        "hf: config.json + safetensors")
    parser.add_argument("src", help="the downloaded checkpoint directory")
    parser.add_argument("out", help="the weights directory to write (must not exist)")
    parser.add_argument("--dtype", choices=list(_IMPORT_DTYPES), default="keep",
                        help="store the weights as fp32 or bf16 (default: as in the source)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="model.arch.max_seq_len (default: from the source config)")
    parser.add_argument("--rope-scaling-factor", type=float, default=None,
                        help="meta with use_scaled_rope: the scaling factor (default 8, Llama 3.1's; 32 for 3.2)")
    args = parser.parse_args(argv)

    from recipe.interop.weights import ARCH_YAML_FILE, MODEL_ARGS_FILE, arch_flags, check_new_output
    from recipe.model_info import describe_model

    src, out = Path(args.src), Path(args.out)
    check_new_output(out)  # before any work
    if not src.is_dir():
        raise InteropError(f"{src} is not a directory; pass the downloaded checkpoint directory")
    dtype = getattr(torch, _IMPORT_DTYPES[args.dtype]) if _IMPORT_DTYPES[args.dtype] else None
    if args.format == "meta":
        from recipe.interop.meta import import_meta

        model_args = import_meta(src, out, dtype, args.max_seq_len, args.rope_scaling_factor)
    else:
        from recipe.interop.hf import import_hf

        model_args = import_hf(src, out, dtype, args.max_seq_len)
    print(describe_model(model_args))
    print(f"\nwrote {out} (weights, {MODEL_ARGS_FILE}, {ARCH_YAML_FILE}). Continue pre-training from it with\n"
          f"  recipe fit --config <your config> --config {out / ARCH_YAML_FILE}\n"
          f"or these overrides:\n  {arch_flags(model_args, out)}")
    return 0


def export_main(argv: list[str]) -> int:
    from recipe.interop.export import DEFAULT_SHARD_BYTES, DTYPES

    parser = argparse.ArgumentParser(
        prog="recipe export", description="a recipe checkpoint -> Hugging Face LlamaForCausalLM (safetensors)")
    parser.add_argument("ckpt", help="a .ckpt file, a distributed checkpoint directory, a saved average "
                        "(torch.save state dict) or a `recipe import` directory")
    parser.add_argument("out", help="the directory to write (must not exist)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--averaged", default=None, metavar="NAME",
                        help="export a weight average kept by the checkpoint (e.g. polyak, ema)")
    parser.add_argument("--config", default=None, help="the run's YAML config or a model_args.json "
                        "(default: the architecture recorded in the checkpoint)")
    parser.add_argument("--tokenizer", default=None, help="tiktoken BPE file (default: Llama 3's, from llama-models)")
    parser.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    parser.add_argument("--max-shard-size", type=_size, default=DEFAULT_SHARD_BYTES, help="e.g. 5GB (default)")
    args = parser.parse_args(argv)

    from recipe.interop.checkpoint import open_weights
    from recipe.interop.export import export_hf
    from recipe.interop.weights import check_new_output, load_model_args

    check_new_output(Path(args.out))  # before any work
    source = open_weights(args.ckpt, args.averaged)
    model_args = load_model_args(args.config) if args.config else source.args
    if model_args is None:
        raise InteropError(f"{args.ckpt} records no model architecture; pass --config with the run's YAML config "
                           "(model.arch) or a model_args.json")
    tokenizer = None if args.no_tokenizer else _tokenizer(args.tokenizer)
    summary = export_hf(source, model_args, args.out, dtype=DTYPES[args.dtype], tokenizer=tokenizer,
                        max_shard_bytes=args.max_shard_size)
    print(f"wrote {summary.out}: {summary.tensors} tensors, {summary.bytes / 1e9:.2f} GB {args.dtype} in "
          f"{len([f for f in summary.files if f.endswith('.safetensors')])} safetensors file(s); "
          f"{', '.join(f for f in summary.files if not f.endswith('.safetensors'))}")
    return 0


def _tokenizer(path: str | None):  # noqa: ANN202
    from recipe.tokenizer import Tokenizer

    return Tokenizer(path)


def generate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recipe generate", description="sample text from a checkpoint")
    parser.add_argument("--ckpt", required=True, help="any recipe checkpoint (as for `recipe export`)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6, help="0: greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--averaged", default=None, metavar="NAME", help="sample from a weight average (e.g. polyak)")
    parser.add_argument("--config", default=None, help="the run's YAML config or a model_args.json")
    parser.add_argument("--tokenizer", default=None, help="tiktoken BPE file (default: Llama 3's)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or not 0.0 < args.top_p <= 1.0 or args.temperature < 0:
        raise InteropError("--max-new-tokens must be >= 1, --top-p in (0, 1] and --temperature >= 0")

    from recipe.interop.generate import generate, load_model
    from recipe.interop.weights import check_vocabulary

    tokenizer = _tokenizer(args.tokenizer)
    model = load_model(args.ckpt, args.config, args.averaged)
    check_vocabulary(model.args, tokenizer)
    prompt = tokenizer.encode(args.prompt, bos=True)
    new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                   stop_ids=(tokenizer.eos_id, tokenizer.eot_id), vocab_limit=tokenizer.vocab_size)
    text = tokenizer.decode([t for t in new if t not in (tokenizer.eos_id, tokenizer.eot_id)])
    sys.stdout.write(args.prompt + text + "\n")
    return 0


def main(command: str, argv: list[str]) -> int:
    """Entry point of ``recipe import|export|generate`` (errors propagate to ``recipe.cli``)."""
    commands = {"import": import_main, "export": export_main, "generate": generate_main}
    return commands[command](argv)
