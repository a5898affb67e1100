"""CPU MFU: model FLOP/s of a training step over this machine's measured GEMM peak.

The peak is what ``torch.mm`` reaches on this machine at the model's own matmul shapes
(the best of them, fp32, as many threads as torch uses); the achieved rate counts the
model's training FLOPs per token (``recipe.flops``) over the wall time of full training
steps (forward, backward, clipping, AdamW) of a 58.7M-parameter Llama (dim 512, 8
layers, a 32K vocabulary, 4 x 512 tokens per step). Both are measured in this run.
Target: at least 50%.

    python bench/cpu_mfu.py [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.flops import flops_per_token  # noqa: E402
from recipe.model import ModelArgs  # noqa: E402
from recipe.module import LlamaLightningModule  # noqa: E402
from recipe.config import OptimizerConfig  # noqa: E402
from recipe.config import LRSchedule  # noqa: E402

ARCH = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32768, multiple_of=256,
                 ffn_dim_multiplier=None, max_seq_len=512)
SEQ_LEN, MICRO = 512, 4


def gemm_peak(repeats: int = 5) -> tuple[float, str]:
    """Best fp32 FLOP/s of torch.mm over the model's matmul shapes (tokens x in -> out)."""
    tokens = SEQ_LEN * MICRO
    kv = ARCH.n_kv_heads * ARCH.head_dim
    shapes = {"wq/wo": (ARCH.dim, ARCH.dim), "wk/wv": (ARCH.dim, kv), "w1/w3": (ARCH.dim, ARCH.ffn_hidden_dim),
              "w2": (ARCH.ffn_hidden_dim, ARCH.dim), "output": (ARCH.dim, ARCH.vocab_size)}
    best, where = 0.0, ""
    for name, (k, n) in shapes.items():
        a, b = torch.randn(tokens, k), torch.randn(k, n)
        torch.mm(a, b)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        rate = 2 * tokens * k * n * repeats / (time.perf_counter() - start)
        if rate > best:
            best, where = rate, f"{name} [{tokens}x{k}]@[{k}x{n}]"
    return best, where


def training_step(compiled: bool = False) -> tuple[Callable[[], None], int]:
    """One full training step of the bench model on a fixed batch, and the parameter count.

    ``compiled``: blocks compiled as ``Parallel4DStrategy(compile=True)`` does (``bench/compile.py``).
    """
    torch.manual_seed(0)
    module = LlamaLightningModule(arch=ARCH, optimizer=OptimizerConfig(lr=1e-3),
                                  lr_schedule=LRSchedule(warmup_steps=1, decay_steps=100, min_lr=1e-4))
    module.configure_model()
    if compiled:
        from recipe.parallel.compile import apply_compile

        apply_compile(module.model, "cpu")
    optimizer = module.configure_optimizers()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ARCH.vocab_size, (MICRO, SEQ_LEN + 1), generator=generator)
    doc_ids = torch.zeros_like(tokens)

    def step() -> None:
        module.micro_batch_loss(tokens, doc_ids, MICRO * SEQ_LEN).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in module.parameters())


def training_flops_rate(steps: int) -> tuple[float, int]:
    """(model FLOP/s of whole training steps, parameter count)."""
    step, params = training_step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return flops_per_token(ARCH, SEQ_LEN) * MICRO * SEQ_LEN / seconds, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    peak, where = gemm_peak()
    achieved, params = training_flops_rate(args.steps)
    result = {"bench": "cpu_mfu", "gemm_peak_flops": peak, "peak_shape": where, "achieved_flops": achieved,
              "mfu": achieved / peak, "threads": torch.get_num_threads(), "target": ">= 0.5", "params": params}
    result["headline"] = [{"name": "MFU (model FLOP/s / GEMM peak)", "value": 100 * result["mfu"], "unit": "%",
                           "target": ">= 50", "met": result["mfu"] >= 0.5}]
    print(f"{params / 1e6:.1f}M parameters. GEMM peak {peak / 1e9:.1f} GFLOP/s ({where}, {torch.get_num_threads()} threads); training "
          f"{achieved / 1e9:.1f} GFLOP/s: MFU {achieved / peak:.1%} (target >= 50%)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
