"""GPU readiness: step time and BF16 MFU of an 8B-shaped slice of Llama 3 on one NVIDIA GPU.

A few transformer blocks at the real 8B width (dim 4096, 32 heads, 8 KV heads, FFN
14336, the 128K vocabulary) train on random tokens at sequence length 8192 with the
recipe's own model and FSDP2 mixed precision (bf16 parameters and compute, fp32
gradient reduction) on a one-rank mesh, and fused AdamW. SDPA picks its flash kernel on
the GPU. After warm-up the script times the steps and prints one results line:

    gpu_check: NVIDIA H100 80GB HBM3 | 4 layers x dim 4096, seq 8192, micro 1 | 0.412 s/step | 19,883 tok/s |
    tflops 487.1 | bf16 MFU 49.2% (peak 989 TFLOP/s) | peak memory 41.3 GiB

Nothing is downloaded; it needs PyTorch with CUDA and this repository. Typical wall time
is 1-3 minutes on an H100 (well under the 8-minute budget). ``--smoke`` runs a tiny
shape on the CPU to check the script itself.

    python bench/gpu_check.py [--layers 4] [--seq-len 8192] [--micro-batch 1] [--steps 10] [--compile]
                              [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.flops import DEVICE_PEAK_FLOPS, flops_per_token  # noqa: E402
from recipe.model import ModelArgs, Transformer  # noqa: E402
from recipe.parallel.compile import apply_compile  # noqa: E402
from recipe.parallel.fsdp import apply_fsdp  # noqa: E402


def peak_for(name: str) -> float:
    lowered = name.lower()
    if "h200" in lowered:
        return DEVICE_PEAK_FLOPS["h200"]
    if "h100" in lowered:
        return DEVICE_PEAK_FLOPS["h100-pcie" if "pcie" in lowered else "h100-sxm"]
    if "a100" in lowered:
        return DEVICE_PEAK_FLOPS["a100"]
    return DEVICE_PEAK_FLOPS["h100-sxm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak (default: from the GPU's name)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (as the strategy's compile: true)")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run that checks the script")
    args = parser.parse_args()

    if args.smoke:
        device = torch.device("cpu")
        arch = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                         ffn_dim_multiplier=None, max_seq_len=128)
        args.seq_len, args.steps, args.warmup = 128, 2, 1
        name, backend, precision = "cpu (smoke)", "gloo", "fp32"
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device visible; run it on a machine with an NVIDIA GPU (or pass --smoke)")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        arch = ModelArgs(dim=4096, n_layers=args.layers, n_heads=32, n_kv_heads=8, vocab_size=128256,
                         multiple_of=1024, ffn_dim_multiplier=1.3, max_seq_len=args.seq_len)
        name, backend, precision = torch.cuda.get_device_name(device), "nccl", "bf16"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("dp",))
        with torch.device("meta"):
            model = Transformer(arch)
        if args.compile:
            apply_compile(model, device.type)
        apply_fsdp(model, mesh, precision=precision)
        model.to_empty(device=device)
        model.init_weights(buffer_device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        tokens = torch.randint(0, arch.vocab_size, (args.micro_batch, args.seq_len + 1), device=device)

        def step() -> None:
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for _ in range(args.warmup):
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds = (time.perf_counter() - start) / args.steps
        tokens_per_s = args.micro_batch * args.seq_len / seconds
        achieved = flops_per_token(arch, args.seq_len) * tokens_per_s
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_for(name)
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"gpu_check: {name} | {arch.n_layers} layers x dim {arch.dim}, seq {args.seq_len}, micro "
              f"{args.micro_batch}{', compiled' if args.compile else ''} | {seconds:.3f} s/step | {tokens_per_s:,.0f} tok/s | tflops {achieved / 1e12:.1f} | "
              f"bf16 MFU {achieved / peak:.1%} (peak {peak / 1e12:.0f} TFLOP/s) | peak memory {memory:.1f} GiB")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
