"""GPU check of the memory model: the planner and the live-tensor tracker against CUDA's allocator.

An 8B-shaped slice (dim 4096, 32 heads, 8 KV heads, FFN
14336, the 128K vocabulary, sequence 8192) on one GPU with the recipe's FSDP2 mixed
precision (bf16 parameters and compute, fp32 reduction, fp32 master weights) and fused
AdamW. After two warm-up steps one step runs under ``recipe.memory.LiveTensorMemory``
with the allocator's peak reset, for two ways of writing the step:

* ``recipe``: the loss computed and the logits dropped before the backward pass, as
  ``LlamaLightningModule.micro_batch_loss`` does;
* ``gpu_check``: the step of the former standalone ``bench/gpu_check.py`` (before it
  handed over to ``bench/gpu_train.py``), which keeps the bf16 logits referenced until the
  step ends.

Each line prints ``torch.cuda.max_memory_allocated``, the tracker's peak and the
planner's estimate (``recipe.planner.estimate`` of one bf16 rank with fused AdamW).

    python bench/gpu_memory.py [--layers 4] [--seq-len 8192] [--micro-batch 1 2] [--json out.json]

``--smoke`` runs a tiny fp32 shape on the CPU (no allocator figures) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.memory import LiveTensorMemory  # noqa: E402
from recipe.model import ModelArgs, Transformer  # noqa: E402
from recipe.parallel.fsdp import apply_fsdp  # noqa: E402
from recipe.planner import Layout, estimate  # noqa: E402

GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run that checks the script")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        device, precision, backend = torch.device("cpu"), "fp32", "gloo"
        arch = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                         ffn_dim_multiplier=None, max_seq_len=128)
        args.seq_len, args.micro_batch = 128, [1]
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_memory: no CUDA device visible; run it on an NVIDIA GPU (or pass --smoke)")
        device, precision, backend = torch.device("cuda", 0), "bf16", "nccl"
        torch.cuda.set_device(device)
        arch = ModelArgs(dim=4096, n_layers=args.layers, n_heads=32, n_kv_heads=8, vocab_size=128256,
                         multiple_of=1024, ffn_dim_multiplier=1.3, max_seq_len=args.seq_len)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29519")
    dist.init_process_group(backend, rank=0, world_size=1)
    rows = []
    unit, label = (2**20, "MiB") if args.smoke else (GIB, "GiB")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("dp",))
        with torch.device("meta"):
            model = Transformer(arch)
        apply_fsdp(model, mesh, precision=precision)
        model.to_empty(device=device)
        model.init_weights(buffer_device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def loss_of(tokens: torch.Tensor) -> torch.Tensor:
            logits = model(tokens[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

        def recipe_step(tokens: torch.Tensor) -> None:
            loss_of(tokens).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def gpu_check_step(tokens: torch.Tensor) -> None:
            logits = model(tokens[:, :-1])  # referenced until the step returns
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for micro in args.micro_batch:
            tokens = torch.randint(0, arch.vocab_size, (micro, args.seq_len + 1), device=device)
            planned = estimate(arch, Layout(dp=1), args.seq_len, micro * args.seq_len, micro,
                               precision=precision, optimizer="fused" if device.type == "cuda" else "for-loop")
            for name, step in (("recipe", recipe_step), ("gpu_check", gpu_check_step)):
                for _ in range(2):
                    step(tokens)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                with LiveTensorMemory(model.parameters()) as tracker:
                    step(tokens)
                allocator = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
                rows.append({"step": name, "micro_batch": micro, "allocator_gib": allocator / GIB,
                             "tracker_gib": tracker.result.device(str(device)) / GIB,
                             "planner_gib": planned.memory_total / GIB})
                r = {k: v * GIB / unit for k, v in rows[-1].items() if k.endswith("_gib")}
                print(f"gpu_memory: {name:9s} micro {micro} | max_memory_allocated {r['allocator_gib']:.2f} {label} | "
                      f"tracker {r['tracker_gib']:.2f} {label} | planner {r['planner_gib']:.2f} {label}", flush=True)
    finally:
        dist.destroy_process_group()
    if args.json is not None:
        args.json.write_text(json.dumps({"bench": "gpu_memory", "device": str(device), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
