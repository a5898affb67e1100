"""GPU check through the product: the real Trainer, LightningModule and Parallel4DStrategy on one GPU.

What runs is what ``recipe fit`` runs: ``LlamaLightningModule`` (recipe/module.py) under
``Parallel4DStrategy`` (recipe/parallel/strategy.py) on a one-rank NCCL mesh, with the
strategy's bf16 FSDP2 mixed precision (bf16 parameters and compute, fp32 gradient
reduction and master weights), fused AdamW (``OptimizerConfig(fused=True)``), gradient
clipping, and the attention backend of ``--attention`` (``model.attention``).

Data, in the paper's shape: rows of 8,192 tokens packed with documents, with their
document ids, so attention stays inside each document (the document mask). The documents are the standard library's
modules cut into pieces whose token lengths follow a log-normal distribution (mean
``--doc-mean``, default 1,500 tokens, capped at ``--doc-cap``); they go through the real
data path: ``recipe.data.build.build_shards`` (Llama 3 tokenizer, ``bos`` + text + ``eos``)
and ``TokenDataModule``'s token stream, which cuts rows across document boundaries as
in training. Nothing is downloaded and no batch is synthesised.

Two phases, each run in a fresh process (clean allocator statistics; an out-of-memory
run cannot disturb the next):

1. Throughput: an 8B-shaped slice (``--layers`` blocks at dim 4096, 32 heads, 8 KV
   heads, FFN 14336, the 128K vocabulary) at ``--seq-len`` for each ``--micro-batch``,
   ``--warmup`` steps then ``--steps`` timed steps (wall clock from the end of the last
   warm-up step to the end of the last step, data loading included).
2. Long context: the longest sequence one GPU trains with full activation
   checkpointing (``--long-layers`` blocks at the same width). The planner
   (``recipe.planner.estimate``) predicts each of ``--long-seq-lens`` against the GPU's
   memory; the run starts at the longest predicted to fit, goes on up while runs train
   (so the first length predicted not to fit is tried too) and down after an
   out-of-memory. At any model size the loss bounds this: its fp32 log-softmax and
   gradients take about 12 bytes x 128,256 per token.

Each run prints one line on stdout (progress and step lines go to stderr):

    gpu_train: <GPU> | <layers> layers x dim <dim>, seq <seq>, micro <m>, attention <backend> | <n> documents/row,
      <mean> tokens each in the row | <s> s/step | <n> tok/s | tflops <model TFLOP/s> | bf16 MFU <%> (peak <P>
      TFLOP/s, <where from>; <%> counting whole causal rows) | peak memory <GiB> (planner <GiB>, most of it <part>)
      | loss <first> -> <last> | nccl, bf16 FSDP2, fused AdamW

then, for the long-context phase, one such line per length tried (or ``out of memory``)
and a last line with the longest length that trained and the planner's longest.

Model FLOPs are ``recipe.flops.flops_per_token`` with the document lengths of the timed
batches: matmuls (6 x their weights per token) plus causal attention over the pairs
inside each document only (``C = sum(d^2) / sum(d) / 2`` keys per query, d the segment
lengths of the rows). The figure in parentheses counts whole causal rows
(``C = seq / 2``), the convention of MFU figures that ignore the mask. The peak is the
GPU's dense bf16 peak, from its name (H100 SXM and H200: 989 TFLOP/s) or
``--peak-tflops``. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed
steps, beside the planner's estimate for the same shape (one bf16 rank, fused AdamW,
packed rows, the chosen attention backend).

    python bench/gpu_train.py [--layers 4] [--seq-len 8192] [--micro-batch 1 2] [--steps 10] [--warmup 3]
                              [--attention auto] [--compile] [--long-layers 2]
                              [--long-seq-lens 16384 32768 65536 131072] [--no-long-context]
    python bench/gpu_train.py --cpu     # tiny shapes on the CPU (gloo, fp32): checks the script itself

``--cpu`` runs fixed tiny shapes (2 blocks at dim 64, 128-token rows of ~40-token
documents; long context 192 and 256 tokens on one block) for 2 warm-up steps and 1 timed
step. It measures the peak with ``recipe.memory.LiveTensorMemory`` (the live tensor
bytes of the last warm-up step) instead of CUDA's allocator, and the MFU against this
CPU's measured fp32 GEMM peak: figures that check the plumbing, not the CPU. ``bench/gpu_check.py`` runs phase 1 under its old
command line; ``bench/gpu_step.py`` checks the step path's validation and DCP checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.config import ATTENTION_BACKENDS, ModelArgs  # noqa: E402

GIB, MIB = 2**30, 2**20


# ----------------------------------------------------------------------------- data


def build_data(root: Path, doc_mean: float, doc_sigma: float, doc_cap: int, seed: int = 0) -> Path:
    """Shards of standard-library text cut into documents of log-normal token lengths."""
    import numpy as np

    from recipe.data.build import build_shards
    from recipe.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in sorted(stdlib.glob("*.py"))]
    rng = np.random.default_rng(seed)
    mu = np.log(doc_mean) - doc_sigma**2 / 2  # the log-normal's mean is exp(mu + sigma^2 / 2)
    documents = []
    for ids in tokenizer.encode_batch(texts, bos=False, eos=False):
        start = 0
        while start < len(ids):
            length = int(np.clip(rng.lognormal(mu, doc_sigma), 1, doc_cap - 2))  # build adds bos and eos
            documents.append(tokenizer.decode(ids[start:start + length]))
            start += length
    corpus = root / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as out:
        for text in documents:
            out.write(json.dumps({"text": text}) + "\n")
    build_shards(corpus, root / "shards", tokenizer=tokenizer, val_fraction=0.01)
    return root / "shards"


def segment_lengths(doc_ids) -> list[int]:
    """Lengths of the same-document runs of every input row: what the document mask attends within."""
    import torch

    rows = doc_ids[..., :-1].reshape(-1, doc_ids.shape[-1] - 1).cpu()
    lengths = []
    for row in rows:
        cuts = (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()
        edges = [0, *cuts, row.numel()]
        lengths += [b - a for a, b in zip(edges, edges[1:])]
    return lengths


# ----------------------------------------------------------------------------- one run (a child process)


def train_once(run: dict) -> dict:
    """Fit the LightningModule for ``warmup + steps`` steps under the strategy; timings and peak memory."""
    import gc

    import lightning as L
    import torch

    from recipe.config import LRSchedule, OptimizerConfig
    from recipe.data.datamodule import TokenDataModule
    from recipe.memory import LiveTensorMemory
    from recipe.module import LlamaLightningModule
    from recipe.parallel.strategy import Parallel4DStrategy

    on_gpu = not run["cpu"]
    warmup, steps = run["warmup"], run["steps"]
    info = {"device": torch.cuda.get_device_name() if on_gpu else "cpu (smoke)",
            "memory_bytes": (torch.cuda.get_device_properties(0).total_memory if on_gpu
                             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))}

    class StepClock(L.Callback):
        """Step end times, the timed batches' document ids, and the peak memory."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.doc_ids: list[torch.Tensor] = []
            self.tracker: LiveTensorMemory | None = None
            self.live_peak: int | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if len(self.ends) >= warmup:
                self.doc_ids.append(batch["doc_ids"])
            elif not on_gpu and len(self.ends) == warmup - 1:  # the CPU has no allocator statistics
                gc.collect()
                self.tracker = LiveTensorMemory(params=pl_module.parameters()).__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            if self.tracker is not None:
                self.tracker.__exit__(None, None, None)
                self.live_peak, self.tracker = self.tracker.result.device("cpu"), None
            if on_gpu and len(self.ends) == warmup:
                torch.cuda.reset_peak_memory_stats()
            self.losses.append(float(trainer.callback_metrics["train/loss"]))
            step = len(self.ends)
            took = self.ends[-1] - self.ends[-2] if step > 1 else float("nan")
            print(f"  step {step}: loss {self.losses[-1]:.4f} {took:.3f} s{' (warm-up)' if step <= warmup else ''}",
                  flush=True)

    clock = StepClock()
    arch = ModelArgs(**run["arch"])
    module = LlamaLightningModule(
        arch=arch, optimizer=OptimizerConfig(lr=1e-4, fused=True if on_gpu else None),
        lr_schedule=LRSchedule(warmup_steps=1, decay_steps=warmup + steps, min_lr=1e-5),
        init_mode="local",  # drawn on the GPU: "replicable" draws every parameter on the host first
    )
    strategy = Parallel4DStrategy(dp_shard=1, precision="bf16" if on_gpu else "fp32", compile=run["compile"],
                                  activation_checkpointing=run["activation_checkpointing"])
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=1, strategy=strategy, max_steps=warmup + steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=run["root"], callbacks=[clock],
    )
    data = TokenDataModule(data_dir=run["data_dir"], seq_len=run["seq_len"], global_batch_size=run["micro_batch"],
                           micro_batch_size=run["micro_batch"], val_batches=1, build_demo=False)
    try:
        trainer.fit(module, datamodule=data)
    except torch.OutOfMemoryError as error:
        return {**info, "status": "out of memory", "error": str(error).splitlines()[0][:300],
                "peak_bytes": torch.cuda.max_memory_allocated()}
    if len(clock.ends) != warmup + steps:
        return {**info, "status": f"stopped after {len(clock.ends)} of {warmup + steps} steps"}
    return {**info, "status": "ok", "backend": torch.distributed.get_backend(),
            "step_s": (clock.ends[-1] - clock.ends[warmup - 1]) / steps,
            "losses": clock.losses, "doc_lengths": [n for ids in clock.doc_ids for n in segment_lengths(ids)],
            "peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else clock.live_peak}


def run_child(run: dict, index: int, timeout: float) -> dict:
    """``train_once`` in a fresh process; its output goes to stderr."""
    result = Path(run["root"]) / "result.json"
    Path(run["root"]).mkdir(parents=True)
    (Path(run["root"]) / "run.json").write_text(json.dumps(run))
    env = dict(os.environ)
    if "MASTER_PORT" in env:  # one port per run: a finished run's port may still be closing
        env["MASTER_PORT"] = str(int(env["MASTER_PORT"]) + index)
    try:
        done = subprocess.run([sys.executable, __file__, "--child", str(Path(run["root"]) / "run.json")],
                              stdout=sys.stderr, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    if result.is_file():
        return json.loads(result.read_text())
    return {"status": f"failed (exit code {done.returncode}; its traceback is above)"}


# ----------------------------------------------------------------------------- plan and report


def planned(arch: ModelArgs, seq_len: int, micro: int, activation_checkpointing: str, on_gpu: bool,
            memory_bytes: float):
    """The planner's estimate of one rank, attending with ``arch.attention``."""
    from recipe.planner import HARDWARE, Layout, estimate

    hardware = replace(HARDWARE["h100-80gb"], memory_bytes=memory_bytes)
    return estimate(arch, Layout(dp=1, activation_checkpointing=activation_checkpointing), seq_len, micro * seq_len,
                    micro, hardware, precision="bf16" if on_gpu else "fp32",
                    optimizer="fused" if on_gpu else "for-loop")


@functools.lru_cache
def peak_flops_of(device: str, override_tflops: float | None) -> tuple[float, str]:
    """Dense peak FLOP/s of the device and how it was found."""
    from recipe.flops import DEVICE_PEAK_FLOPS, measured_peak_flops

    if override_tflops:
        return override_tflops * 1e12, "given"
    name = device.lower()
    if name.startswith("cpu"):
        return measured_peak_flops(size=1024), "measured fp32 GEMM"
    for key, known in (("h200", "h200"), ("h100", "h100-pcie" if "pcie" in name else "h100-sxm"), ("a100", "a100")):
        if key in name:
            return DEVICE_PEAK_FLOPS[known], known
    return DEVICE_PEAK_FLOPS["h100-sxm"], "unknown GPU: H100 SXM's assumed"


def describe_run(arch: ModelArgs, seq_len: int, micro: int, result: dict, estimate, on_gpu: bool,
                 peak_tflops: float | None) -> str:
    """``documents | s/step | tok/s | tflops | MFU | peak memory (planner) | loss | backend`` of one run."""
    from recipe.flops import flops_per_token

    unit, label = (GIB, "GiB") if on_gpu else (MIB, "MiB")
    biggest = max(estimate.memory, key=estimate.memory.get)
    verdict = "" if estimate.fits else ", predicted not to fit"
    predicted = f"planner {estimate.memory_total / unit:.1f} {label}{verdict}, most of it {biggest}"
    if result["status"] != "ok":
        held = result.get("peak_bytes")
        return result["status"] + (f" with {held / unit:.1f} {label} allocated" if held else "") + f" ({predicted})"
    lengths = result["doc_lengths"]
    rows = sum(lengths) / seq_len
    tokens_per_s = micro * seq_len / result["step_s"]
    achieved = flops_per_token(arch, seq_len, doc_lengths=lengths) * tokens_per_s
    whole_rows = flops_per_token(arch, seq_len) * tokens_per_s
    peak, source = peak_flops_of(result["device"], peak_tflops)
    decimals = 1 if on_gpu else 4  # decimals of the TFLOP/s: a CPU makes a few GFLOP/s
    losses = result["losses"]
    return (f"{len(lengths) / rows:.1f} documents/row, {sum(lengths) / len(lengths):,.0f} tokens each in the row | "
            f"{result['step_s']:.3f} s/step | {tokens_per_s:,.0f} tok/s | tflops {achieved / 1e12:.{decimals}f} | "
            f"{'bf16' if on_gpu else 'fp32'} MFU {achieved / peak:.1%} "
            f"(peak {peak / 1e12:.{decimals}f} TFLOP/s, {source}; "
            f"{whole_rows / peak:.1%} counting whole causal rows) | peak memory {result['peak_bytes'] / unit:.1f} "
            f"{label} ({predicted}) | loss {losses[0]:.2f} -> {losses[-1]:.2f} | {result['backend']}, "
            f"{'bf16 FSDP2, fused AdamW' if on_gpu else 'fp32, AdamW'}")


# ----------------------------------------------------------------------------- the two phases


def main(argv: list[str] | None = None, prog: str = "gpu_train") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="blocks of the throughput slice (default: 4)")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1, 2], help="one run per value")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help="model.attention")
    parser.add_argument("--activation-checkpointing", choices=["none", "selective", "full"], default="none",
                        help="of the throughput runs (the long-context runs use full)")
    parser.add_argument("--compile", action="store_true", help="the strategy's compile: true")
    parser.add_argument("--doc-mean", type=float, default=1500.0, help="mean document length in tokens")
    parser.add_argument("--doc-sigma", type=float, default=1.0, help="sigma of the log-normal document lengths")
    parser.add_argument("--doc-cap", type=int, default=8192, help="longest document in tokens")
    parser.add_argument("--long-layers", type=int, default=2, help="blocks of the long-context model")
    parser.add_argument("--long-seq-lens", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--long-steps", type=int, default=2, help="timed steps per long-context run")
    parser.add_argument("--no-long-context", action="store_true", help="skip the long-context phase")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak (default: from the GPU's name)")
    parser.add_argument("--capacity-gib", type=float, default=None,
                        help="memory the planner plans for (default: the GPU's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (gloo, fp32): checks the script")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        run = json.loads(Path(args.child).read_text())
        result = train_once(run)
        (Path(run["root"]) / "result.json").write_text(json.dumps(result))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # the result is written; after an out-of-memory error NCCL's teardown can hang
    if args.warmup < 1 or args.steps < 1 or args.long_steps < 1:
        parser.error("--warmup, --steps and --long-steps must be at least 1")

    on_gpu = not args.cpu
    if args.cpu:  # the old smoke shape: 2 blocks at dim 64, 128-token rows of documents ~40 tokens long
        base = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=None,
                         max_seq_len=128, attention=args.attention)
        seq_len, micro_batches, warmup, steps = 128, [1], 2, 1
        doc_mean, doc_cap, long_lens, long_layers, long_warmup, long_steps = 40.0, 128, [192, 256], 1, 2, 1
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"{prog}: no CUDA device; pass --cpu to check the script on the CPU")
        base = ModelArgs(dim=4096, n_layers=args.layers, n_heads=32, n_kv_heads=8, multiple_of=1024,
                         ffn_dim_multiplier=1.3, max_seq_len=args.seq_len, attention=args.attention)
        seq_len, micro_batches, warmup, steps = args.seq_len, args.micro_batch, args.warmup, args.steps
        doc_mean, doc_cap, long_lens, long_layers = args.doc_mean, args.doc_cap, sorted(args.long_seq_lens), \
            args.long_layers
        long_warmup, long_steps = 1, args.long_steps
    label = f"attention {args.attention}{', compiled' if args.compile else ''}"

    failures = 0
    with tempfile.TemporaryDirectory(prefix=f"{prog}_") as tmp:
        root = Path(tmp)
        print(f"{prog}: building packed-document shards from the standard library", file=sys.stderr, flush=True)
        data_dir = build_data(root, doc_mean, args.doc_sigma, doc_cap)
        runs = 0

        def launch(arch: ModelArgs, seq: int, micro: int, checkpointing: str, warm: int, timed: int) -> dict:
            nonlocal runs
            run = {"arch": asdict(arch), "seq_len": seq, "micro_batch": micro, "warmup": warm, "steps": timed,
                   "activation_checkpointing": checkpointing, "compile": args.compile, "cpu": args.cpu,
                   "data_dir": str(data_dir), "root": str(root / f"run{runs}")}
            runs += 1
            print(f"{prog}: training {arch.n_layers} layers x dim {arch.dim}, seq {seq:,}, micro {micro}, "
                  f"activation checkpointing {checkpointing}", file=sys.stderr, flush=True)
            return run_child(run, runs - 1, args.timeout)

        # 1. Throughput at the paper's row length.
        memory_bytes = args.capacity_gib * GIB if args.capacity_gib else None
        device = "?"
        for micro in micro_batches:
            result = launch(base, seq_len, micro, args.activation_checkpointing, warmup, steps)
            device = result.get("device", device)
            memory_bytes = memory_bytes or result.get("memory_bytes")
            estimate = planned(base, seq_len, micro, args.activation_checkpointing, on_gpu, memory_bytes or 80e9)
            print(f"{prog}: {device} | {base.n_layers} layers x dim {base.dim}, seq {seq_len}, micro {micro}, "
                  f"{label} | " + describe_run(base, seq_len, micro, result, estimate, on_gpu, args.peak_tflops),
                  flush=True)
            failures += result["status"] != "ok"

        # 2. Long context: the planner picks where to start, the runs say where it ends.
        if not args.no_long_context:
            def long_arch(seq: int) -> ModelArgs:
                return replace(base, n_layers=long_layers, max_seq_len=seq)

            estimates = {seq: planned(long_arch(seq), seq, 1, "full", on_gpu, memory_bytes or 80e9)
                         for seq in long_lens}
            fitting = [i for i, seq in enumerate(long_lens) if estimates[seq].fits]
            i, direction, results = (fitting[-1] if fitting else 0), 0, {}
            while 0 <= i < len(long_lens):
                seq = long_lens[i]
                results[seq] = result = launch(long_arch(seq), seq, 1, "full", long_warmup, long_steps)
                print(f"{prog}: long context | {device} | {long_layers} layers x dim {base.dim}, seq {seq}, micro 1, "
                      f"full activation checkpointing, {label} | "
                      + describe_run(long_arch(seq), seq, 1, result, estimates[seq], on_gpu, args.peak_tflops),
                      flush=True)
                if result["status"] == "ok" and direction >= 0:
                    direction, i = 1, i + 1  # trained: try the next longer one
                elif result["status"] == "out of memory" and direction <= 0:
                    direction, i = -1, i - 1  # too long: try the next shorter one
                else:
                    break
            trained = [seq for seq, r in results.items() if r["status"] == "ok"]
            crashed = [seq for seq, r in results.items() if r["status"] not in ("ok", "out of memory")]
            failures += bool(crashed) or not trained
            predicted = f"{long_lens[fitting[-1]]:,}" if fitting else "none"
            longest = f"{max(trained):,} tokens" if trained else "none"
            tried = ", ".join(f"{seq:,} {results[seq]['status']}" for seq in sorted(results))
            print(f"{prog}: long context | {device} | longest trained with full activation checkpointing: {longest} "
                  f"(planner's longest predicted to fit: {predicted}; tried {tried})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
