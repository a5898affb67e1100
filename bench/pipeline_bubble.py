"""Pipeline bubble: step time of GPipe, 1F1B and Interleaved1F1B at equal micro-batches.

Two CPU ranks (gloo, one thread each, i.e. one core each on a 2-core machine) run the
recipe's own pipeline (``build_stage_modules`` + ``PipelineRunner``) on a small fp32
Llama: forward + backward of one step of ``m`` micro-batches, GPipe and 1F1B with one
stage per rank, Interleaved1F1B with two (``v = 2``). The ideal pipelined step is the
single-process step (the whole model, the same micro-batches, one thread) divided by the
number of ranks: every rank busy all the time on its share of the work, with nothing
else added. Both cores are busy in a pipelined step, so the reference runs under the
same load: every rank runs the whole model at the same time, each on its own core.
The same run with the other cores idle is shown too: where cores slow each other down
(shared caches, memory bandwidth, or virtual CPUs that are one physical core's hyper-
threads) a rank computes faster while its peer waits in a bubble, which hides part of
the bubble from the step time.

Per schedule the table shows the median step time and four figures:

* bubble: ``step / ideal - 1``, everything a pipelined step adds to the ideal;
* idle: each rank's time blocked waiting for its peer over its time working, from the
  kernel's per-thread accounting (``/proc/thread-self/schedstat``: step time less time
  on a CPU less time waiting for one, so neither slow cores nor other processes count);
  this is what the textbook figure describes;
* work+: a rank's CPU time over its share of the single process's, minus one (what the
  stage machinery and the point-to-point transfers add);
* theory: the textbook bubble ``(pp - 1) / (v * m)``.

Runs alternate between the cases, round after round, so machine noise hits all of them
alike. The optimizer step is left out: it is the same local update under every schedule.

    python bench/pipeline_bubble.py [--microbatches 8] [--repeats 7] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the multi-rank CPU harness the pipeline tests use

from dist_harness import run_world  # noqa: E402
from recipe.model import ModelArgs, Transformer, build_meta_model  # noqa: E402
from recipe.parallel.pipeline import PipelineRunner, build_stage_modules, next_token_loss  # noqa: E402

PP = 2
# (schedule, virtual stages per rank)
SCHEDULES: tuple[tuple[str, int], ...] = (("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2))
REFERENCE = "single process"
ALONE = "single, others idle"


def model_args(dim: int, n_layers: int, seq_len: int) -> ModelArgs:
    # A small vocabulary keeps the output head from outweighing a stage's layers, so the
    # stages are balanced and what is measured is the schedule, not the layout.
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=64,
                     ffn_dim_multiplier=None, max_seq_len=seq_len)


def _thread_cpu() -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of the calling thread."""
    try:
        on_cpu, waiting, _ = Path("/proc/thread-self/schedstat").read_text().split()
    except (OSError, ValueError):  # not Linux, or a kernel without schedstats
        return None
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def _world(dim: int, n_layers: int, seq_len: int, micro_batch: int, n_micro: int, warmup: int,
           repeats: int) -> dict:
    """Runs on every rank; returns ``{case: [[(step, on a CPU, waiting for one) s per rank] per repeat]}``."""
    rank, pp = dist.get_rank(), dist.get_world_size()
    args = model_args(dim, n_layers, seq_len)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (n_micro * micro_batch, seq_len + 1),
                           generator=torch.Generator().manual_seed(1))
    normalizer = tokens[:, 1:].numel()
    runners = {name: PipelineRunner(build_stage_modules(model, rank, pp, spr), dist.group.WORLD, name)
               for name, spr in SCHEDULES}

    def reference() -> None:
        for micro in tokens.split(micro_batch):
            next_token_loss(model(micro[:, :-1]), micro[:, 1:], normalizer).backward()

    def pipelined(runner: PipelineRunner) -> Callable[[], object]:
        return lambda: runner.step(tokens, None, normalizer, n_microbatches=n_micro)

    def alone() -> None:
        if rank == 0:
            reference()

    cases = {REFERENCE: (reference, model.parameters), ALONE: (alone, model.parameters),
             **{name: (pipelined(r), r.parameters) for name, r in runners.items()}}

    def timed(case: str) -> list[tuple[float, float]]:
        run, params = cases[case]
        for p in params():
            p.grad = None
        dist.barrier()
        cpu0, start = _thread_cpu(), time.perf_counter()
        run()
        wall, cpu1 = time.perf_counter() - start, _thread_cpu()
        on_cpu, waiting = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]) if cpu0 and cpu1 else (math.nan, math.nan)
        mine = torch.tensor([wall, on_cpu, waiting], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(pp)]
        dist.all_gather(every, mine)
        return [tuple(t.tolist()) for t in every]

    for case in cases:  # the first pipelined step also builds the schedule (a metadata pass)
        for _ in range(warmup if case != ALONE else 0):
            timed(case)
    samples: dict[str, list[list[tuple[float, float, float]]]] = {case: [] for case in cases}
    order = list(cases)
    for i in range(repeats):
        for case in order[i % len(order):] + order[: i % len(order)]:
            samples[case].append(timed(case))
    return samples


def _median_or_none(values: list[float]) -> float | None:
    return None if any(math.isnan(v) for v in values) else statistics.median(values)


def summarize(samples: dict[str, list[list[tuple[float, float, float]]]], n_micro: int) -> dict:
    # The loaded reference runs are independent copies, each rank's one sample of the
    # single-process time; the unloaded one runs on rank 0 only.
    loaded = [wall for per_rank in samples[REFERENCE] for wall, _, _ in per_rank]
    loaded_cpu = [cpu for per_rank in samples[REFERENCE] for _, cpu, _ in per_rank]
    alone = [per_rank[0][0] for per_rank in samples[ALONE]]
    ideal = statistics.median(loaded) / PP
    ideal_cpu = _median_or_none(loaded_cpu)
    rows = {ALONE: {"step_s": statistics.median(alone), "samples_s": alone},
            REFERENCE: {"step_s": statistics.median(loaded), "samples_s": loaded},
            "ideal (single / pp)": {"step_s": ideal}}
    for name, v in SCHEDULES:
        # A pipelined step ends when its slowest rank does.
        steps = [max(wall for wall, _, _ in per_rank) for per_rank in samples[name]]
        # Per rank: blocked = step - on a CPU - waiting for one; "working" is the rest.
        idle = [statistics.mean((wall - cpu - wait) / (cpu + wait) for wall, cpu, wait in per_rank)
                for per_rank in samples[name]]
        work = [statistics.mean(cpu for _, cpu, _ in per_rank) for per_rank in samples[name]]
        step = statistics.median(steps)
        extra = _median_or_none(work)
        rows[name] = {"step_s": step, "samples_s": steps, "stages_per_rank": v, "bubble_measured": step / ideal - 1,
                      "bubble_idle": _median_or_none(idle),
                      "extra_cpu": extra / (ideal_cpu / PP) - 1 if extra is not None and ideal_cpu else None,
                      "bubble_theory": (PP - 1) / (v * n_micro)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8, help="transformer layers (divisible by 2 x 2 stages)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (m), every schedule")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one warm-up step and three repeats")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.repeats = 1, 3
    if args.layers % (2 * PP):
        parser.error(f"--layers must be a multiple of {2 * PP} (Interleaved1F1B cuts the model into {2 * PP} stages)")
    if args.microbatches < PP:
        parser.error(f"--microbatches must be at least {PP} (1F1B needs one per stage)")

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    samples = run_world(_world, PP, timeout=900, dim=args.dim, n_layers=args.layers, seq_len=args.seq_len,
                        micro_batch=args.micro_batch, n_micro=args.microbatches, warmup=args.warmup,
                        repeats=args.repeats)[0]
    wall = time.perf_counter() - start
    rows = summarize(samples, args.microbatches)

    params = sum(p.numel() for p in build_meta_model(model_args(args.dim, args.layers, args.seq_len)).parameters())
    print(f"{params / 1e6:.1f}M-parameter model (dim {args.dim}, {args.layers} layers), pp={PP}, "
          f"m={args.microbatches} micro-batches of {args.micro_batch}x{args.seq_len} tokens, fp32, gloo, "
          f"1 thread per rank; median of {args.repeats} repeats")

    def cell(value: float | None) -> str:
        return f"{value:>8.3f}" if value is not None else f"{'n/a':>8}"

    print(f"{'case':<22}{'step ms':>10}{'bubble':>8}{'idle':>8}{'work+':>8}{'theory':>8}")
    for case, row in rows.items():
        line = f"{case:<22}{row['step_s'] * 1e3:>10.1f}"
        if "bubble_theory" in row:
            line += (f"{row['bubble_measured']:>8.3f}{cell(row['bubble_idle'])}{cell(row['extra_cpu'])}"
                     f"{row['bubble_theory']:>8.3f}")
        print(line)
    print("bubble: step / ideal - 1. idle: time blocked on the peer / time working, per rank. work+: a rank's "
          "CPU time over its share of the single process's, - 1. theory: (pp - 1) / (v m)")
    speedup = rows["1F1B"]["step_s"] / rows["Interleaved1F1B"]["step_s"]
    speedup_theory = (1 + rows["1F1B"]["bubble_theory"]) / (1 + rows["Interleaved1F1B"]["bubble_theory"])
    interference = rows[REFERENCE]["step_s"] / rows[ALONE]["step_s"]
    print(f"single process, all cores busy / others idle: {interference:.2f}x (above 1: cores slow each other "
          "down, which hides part of the bubble from the step time)")
    print(f"1F1B / Interleaved1F1B step time: {speedup:.3f}x (theory {speedup_theory:.3f}); wall time {wall:.0f} s "
          f"(load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after)")

    if args.json:
        headline = []
        for name, v in SCHEDULES:
            row, theory = rows[name], f"theory {rows[name]['bubble_theory']:.3f}"
            headline += [{"name": f"{name} bubble, step / ideal - 1 (m={args.microbatches}, v={v})",
                          "value": row["bubble_measured"], "unit": "fraction", "target": theory, "met": None},
                         {"name": f"{name} bubble, idle / busy (m={args.microbatches}, v={v})",
                          "value": row["bubble_idle"], "unit": "fraction", "target": theory, "met": None}]
        # No pass mark: on a CPU the interleaved schedule's extra transfers and smaller
        # chunks can cost as much as the bubble it saves, so this is a measurement.
        headline.append({"name": "1F1B / Interleaved1F1B step time", "value": speedup, "unit": "x",
                         "target": f"theory {speedup_theory:.3f}", "met": None})
        result = {"bench": "pipeline_bubble", "headline": headline, "cases": rows, "pp": PP,
                  "microbatches": args.microbatches, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                  "dim": args.dim, "layers": args.layers, "params": params, "warmup": args.warmup,
                  "repeats": args.repeats, "threads_per_rank": 1, "core_interference": interference, "wall_s": wall,
                  "load_average": [load_before, os.getloadavg()[0]]}
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
