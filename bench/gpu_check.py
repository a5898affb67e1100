"""GPU readiness under its old command line: the throughput phase of ``bench/gpu_train.py``.

An 8B-shaped slice of Llama 3 (``--layers`` blocks at dim 4096, 32 heads, 8 KV heads,
FFN 14336, the 128K vocabulary) trains at ``--seq-len`` through the product: the real
Trainer, ``LlamaLightningModule`` and ``Parallel4DStrategy`` (bf16 FSDP2, fused AdamW), on
rows of packed documents with the document mask on. It prints one ``gpu_check:`` line per
run in ``bench/gpu_train.py``'s format (tokens/s, model TFLOP/s, BF16 MFU, peak memory
against the planner) and skips the long-context phase; run ``bench/gpu_train.py`` for both.

This script used to drive the model directly, without the LightningModule, the strategy
or document masks, on random tokens; the README keeps that measurement, marked as such.

    python bench/gpu_check.py [--layers 4] [--seq-len 8192] [--micro-batch 1] [--steps 10] [--warmup 3]
                              [--attention auto] [--compile] [--peak-tflops 989]
    python bench/gpu_check.py --smoke      # tiny shapes on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak (default: from the GPU's name)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (the strategy's compile)")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run that checks the script")
    args = parser.parse_args()
    argv = ["--layers", str(args.layers), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--attention", args.attention, "--no-long-context",
            "--micro-batch", *map(str, args.micro_batch)]
    argv += ["--compile"] * args.compile + ["--cpu"] * args.smoke
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    return gpu_train.main(argv, prog="gpu_check")


if __name__ == "__main__":
    sys.exit(main())
