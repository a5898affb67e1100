"""Document-masked attention on CPU: the segmented backend against the dense mask, time and memory.

One attention call, forward and backward, through ``recipe.attention.attend`` on one row
of packed documents (batch 1), fp32, at 2K, 8K and 32K tokens: ``segmented`` (torch's flash
kernel per document, no seq x seq tensor) against ``dense`` (SDPA with the materialised ``[batch, 1,
q, kv]`` boolean mask, the old reference). Document lengths follow an exponential
distribution with mean 1,024 tokens (``--dist lognormal``: sigma 1): ``seq / 1024``
documents at evenly spaced quantiles, scaled to fill the row, in an order shuffled with a
fixed seed (``--sampling random``: independent draws clipped to [1, seq], the last cut to
fit; a row holds so few documents that the draw then shows in the growth exponents). One
more case at 8K has one document per row, where segmented makes one causal flash call
while dense still applies its mask.

Head shapes: head_dim 128 with 4 query heads sharing 1 KV head (Llama 3's 4:1 grouping).
Llama-3-8B's 32 / 8 heads do not fit the time budget on two cores: CPU SDPA computes
every position pair under an explicit mask, and its backward costs several forwards, so
one dense call at 32K with 4 query heads takes about a minute here, and would take about
eight with 32 (``--heads 32 --kv-heads 8`` runs the real shapes, slowly). Attention time
is linear in the number of heads for both backends, so the time ratios carry over; the
memory ratio does not (dense's mask and its fp32 copy are the same size for any number of
heads), so it favours segmented less at 32 heads than here.

Per case and backend, both sharing the same inputs in one process:

* a forward without gradients builds the plan's device-side pieces (dense: the mask),
  as the first layer of a forward does for the others, so no timing includes it;
* peak memory: one forward + backward under ``recipe.memory.LiveTensorMemory`` (live
  tensor bytes) with nothing else alive but the inputs (q, k, v, the output gradient)
  and the backend's plan; reported as the peak less the inputs, i.e. the memory the
  attention call adds, dense's mask and q/k/v's gradients included;
* time: the median of ``--repeats`` untracked forward + backward calls, alternating
  dense and segmented (the order flips each round) so machine noise hits both alike.
  At ``--dense-once-from`` tokens and above (32K) dense runs once: its time is that of
  the tracked run (the tracker adds a few Python calls to a call of a minute);
* exactness: segmented's output and q/k/v gradients against dense's, max absolute
  difference; the output must agree within 1e-5.

The growth exponent ``p`` (value ~ seq^p) is fitted between successive lengths: dense
should be about quadratic in time and memory, segmented about linear for a fixed mean
document length (its work is the sum of squared document lengths).

    python bench/attention.py [--quick] [--repeats 5] [--json out.json]

``--quick`` measures 2K and 8K only. A full run takes about three minutes on two idle
cores, most of it dense at 32K.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.attention import AttentionPlan, attend, attention_flops_pairs  # noqa: E402
from recipe.memory import measure  # noqa: E402

MIB = 2**20
TOLERANCE = 1e-5
BACKENDS = ("dense", "segmented")


def document_lengths(seq: int, mean: float, dist: str, seed: int, sampling: str = "quantile") -> list[int]:
    """Lengths of the documents packed into one row of ``seq`` tokens, in a fixed random order.

    ``quantile``: ``round(seq / mean)`` documents at evenly spaced quantiles of the
    distribution, scaled to fill the row exactly, so every length has the same mean and
    shape of lengths (a row holds few documents: independent draws would leave, say, 8K
    with 4 documents one of them 6K long, and the growth with length would show the
    draw). ``random``: independent draws clipped to [1, seq], the last one cut to fit.
    """
    rng = np.random.default_rng(seed)
    if sampling == "quantile":
        count = max(1, round(seq / mean))
        p = (np.arange(count) + 0.5) / count
        if dist == "exponential":
            x = -np.log1p(-p)
        else:  # log-normal with sigma 1
            x = np.exp([statistics.NormalDist().inv_cdf(v) for v in p])
        lengths = np.maximum(1, np.round(x / x.sum() * seq)).astype(int)
        lengths[np.argmax(lengths)] += seq - lengths.sum()
        return [int(n) for n in rng.permutation(lengths)]
    lengths: list[int] = []
    while sum(lengths) < seq:
        if dist == "exponential":
            draw = rng.exponential(mean)
        else:  # log-normal with sigma 1 and the same mean
            draw = rng.lognormal(math.log(mean) - 0.5, 1.0)
        lengths.append(int(np.clip(round(draw), 1, seq)))
    lengths[-1] -= sum(lengths) - seq
    return lengths


class Case:
    """Inputs of one measured shape: q, k, v, an output gradient and the document ids."""

    def __init__(self, seq: int, lengths: list[int], heads: int, kv_heads: int, head_dim: int, seed: int) -> None:
        self.seq, self.lengths = seq, lengths
        self.doc_ids = np.repeat(np.arange(len(lengths)), lengths)[None]
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randn(1, seq, heads, head_dim, generator=g).requires_grad_()
        self.k = torch.randn(1, seq, kv_heads, head_dim, generator=g).requires_grad_()
        self.v = torch.randn(1, seq, kv_heads, head_dim, generator=g).requires_grad_()
        self.grad_out = torch.randn(1, seq, heads, head_dim, generator=g)
        self.input_bytes = sum(t.nbytes for t in (self.q, self.k, self.v, self.grad_out))

    def plan(self) -> AttentionPlan:
        return AttentionPlan(self.doc_ids)

    def warm(self, plan: AttentionPlan, backend: str) -> None:
        """A forward without gradients: builds the plan's device-side pieces (dense: its mask)."""
        with torch.no_grad():
            attend(self.q, self.k, self.v, plan, backend)

    def step(self, plan: AttentionPlan, backend: str) -> tuple[float, torch.Tensor]:
        """One timed forward + backward; (seconds, output). Gradients land in q/k/v.grad."""
        for t in (self.q, self.k, self.v):
            t.grad = None
        start = time.perf_counter()
        out = attend(self.q, self.k, self.v, plan, backend)
        out.backward(self.grad_out)
        return time.perf_counter() - start, out.detach()

    def result(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out, self.q.grad, self.k.grad, self.v.grad

    def tracked(self, plan: AttentionPlan, backend: str) -> tuple[float, int, int, tuple[torch.Tensor, ...]]:
        """One forward + backward under the live-tensor tracker: (seconds, peak bytes less the
        inputs, bytes alive on entry less the inputs, (output, gradients))."""
        for t in (self.q, self.k, self.v):
            t.grad = None
        gc.collect()
        (seconds, out), peak = measure(self.step, plan, backend)
        start = peak.start.get("cpu", 0)
        return seconds, peak.device("cpu") - self.input_bytes, start - self.input_bytes, self.result(out)


def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> list[float]:
    return [float((x - y).abs().max()) for x, y in zip(a, b)]


def run_case(case: Case, layout: str, repeats: int, dense_once: bool) -> dict[str, Any]:
    plans: dict[str, AttentionPlan] = {}
    memory: dict[str, int] = {}
    entry: dict[str, int] = {}
    first: dict[str, float] = {}
    results: dict[str, tuple[torch.Tensor, ...]] = {}
    # Tracked runs one backend at a time, segmented first, so no other plan's mask is alive.
    for backend in ("segmented", "dense"):
        plans[backend] = case.plan()
        case.warm(plans[backend], backend)
        first[backend], memory[backend], entry[backend], out = case.tracked(plans[backend], backend)
        if backend == "dense" and dense_once:
            results[backend] = tuple(t.clone() for t in out)
        del out
    times: dict[str, list[float]] = {"dense": [first["dense"]] if dense_once else [], "segmented": []}
    for rnd in range(repeats):
        order = BACKENDS if rnd % 2 == 0 else BACKENDS[::-1]
        for backend in order:
            if backend == "dense" and dense_once:
                continue
            seconds, out = case.step(plans[backend], backend)
            times[backend].append(seconds)
            results[backend] = tuple(t.clone() for t in case.result(out))
    diffs = max_diff(results["segmented"], results["dense"])
    plan = plans["segmented"]
    time_ms = {b: 1e3 * statistics.median(times[b]) for b in BACKENDS}
    return {
        "seq": case.seq, "layout": layout, "docs": len(case.lengths), "longest_doc": max(case.lengths),
        "pairs": attention_flops_pairs(plan), "causal_pairs": case.seq * (case.seq + 1) // 2,
        "time_ms": time_ms, "times_ms": {b: [1e3 * t for t in times[b]] for b in BACKENDS},
        "time_ratio": time_ms["segmented"] / time_ms["dense"],
        "tracked_time_ms": {b: 1e3 * first[b] for b in BACKENDS},
        "peak_mib": {b: memory[b] / MIB for b in BACKENDS}, "memory_ratio": memory["segmented"] / memory["dense"],
        "alive_on_entry_mib": {b: entry[b] / MIB for b in BACKENDS}, "input_mib": case.input_bytes / MIB,
        "dense_runs": len(times["dense"]), "segmented_runs": len(times["segmented"]),
        "max_abs_diff": dict(zip(("out", "dq", "dk", "dv"), diffs)), "exact": diffs[0] <= TOLERANCE,
    }


def exponents(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth exponents of time and memory with the sequence length, packed rows only."""
    rows = sorted((r for r in rows if r["layout"] == "packed"), key=lambda r: r["seq"])
    seqs = np.log([r["seq"] for r in rows])
    out: dict[str, Any] = {"seqs": [r["seq"] for r in rows]}
    for metric, get in (("time", lambda r, b: r["time_ms"][b]), ("memory", lambda r, b: r["peak_mib"][b])):
        for backend in BACKENDS:
            values = np.log([get(r, backend) for r in rows])
            steps = [float((values[i + 1] - values[i]) / (seqs[i + 1] - seqs[i])) for i in range(len(rows) - 1)]
            fit = float(np.polyfit(seqs, values, 1)[0]) if len(rows) > 1 else float("nan")
            out[f"{metric}/{backend}"] = {"steps": steps, "fit": fit}
    pairs = np.log([r["pairs"] for r in rows])
    out["pairs/segmented"] = {"steps": [float((pairs[i + 1] - pairs[i]) / (seqs[i + 1] - seqs[i]))
                                        for i in range(len(rows) - 1)],
                              "fit": float(np.polyfit(seqs, pairs, 1)[0]) if len(rows) > 1 else float("nan")}
    return out


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def size(seq: int) -> str:
    return f"{seq // 1024}K" if seq % 1024 == 0 else str(seq)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2K and 8K only")
    parser.add_argument("--seqs", default=None,
                        help="comma-separated packed sequence lengths (default 2048,8192,32768)")
    parser.add_argument("--one-doc-seq", type=int, default=8192,
                        help="length of the one-document-per-row case (0: none)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per backend (median)")
    parser.add_argument("--dense-once-from", type=int, default=32768,
                        help="from this length on, dense runs once (its tracked run is its time)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--mean-doc", type=float, default=1024.0, help="mean document length in tokens")
    parser.add_argument("--dist", choices=("exponential", "lognormal"), default="exponential")
    parser.add_argument("--sampling", choices=("quantile", "random"), default="quantile",
                        help="document lengths at evenly spaced quantiles, or independent draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else [2048, 8192] if args.quick else [2048, 8192, 32768]
    specs = [(seq, "packed") for seq in seqs]
    if args.one_doc_seq:
        specs.append((args.one_doc_seq, "one_doc"))
    load_start = os.getloadavg()[0]
    print(f"attention forward + backward, batch 1, fp32, {args.heads} query / {args.kv_heads} KV heads x "
          f"{args.head_dim}; document lengths {args.dist}, mean {args.mean_doc:.0f} tokens ({args.sampling}, seed "
          f"{args.seed}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_start:.2f}", flush=True)
    if load_start > 0.5 * (os.cpu_count() or 1):
        print("warning: the machine is busy; timings will be noisy (the ratios less so: runs alternate)", flush=True)

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for seq, layout in specs:
        lengths = ([seq] if layout == "one_doc"
                   else document_lengths(seq, args.mean_doc, args.dist, args.seed + seq, args.sampling))
        case = Case(seq, lengths, args.heads, args.kv_heads, args.head_dim, args.seed)
        t0 = time.perf_counter()
        row = run_case(case, layout, args.repeats, seq >= args.dense_once_from)
        del case
        gc.collect()
        rows.append(row)
        print(f"  {size(seq)} {layout}: {row['docs']} documents (longest {row['longest_doc']}), dense "
              f"{row['time_ms']['dense']:.0f} ms, segmented {row['time_ms']['segmented']:.0f} ms "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    wall = time.perf_counter() - start
    load_end = os.getloadavg()[0]

    print(f"\nAttention forward + backward on CPU: segmented vs dense mask (ratios are segmented / dense; "
          f"memory = peak live tensor bytes less the inputs' {rows[-1]['input_mib']:.0f} MiB at the last case)")
    print(table([[size(r["seq"]) + ("" if r["layout"] == "packed" else " (1 doc)"), r["docs"],
                  f"{r['time_ms']['dense']:.0f}" + ("*" if r["dense_runs"] == 1 else ""),
                  f"{r['time_ms']['segmented']:.0f}", f"{r['time_ratio']:.3f}",
                  f"{r['peak_mib']['dense']:.1f}", f"{r['peak_mib']['segmented']:.1f}", f"{r['memory_ratio']:.3f}",
                  f"{r['max_abs_diff']['out']:.1e}", f"{max(list(r['max_abs_diff'].values())[1:]):.1e}"]
                 for r in rows],
                ["seq", "docs", "dense ms", "segmented ms", "time ratio", "dense MiB", "segmented MiB", "memory ratio",
                 "max|dout|", "max|dgrad|"]))
    once = [size(r["seq"]) for r in rows if r["dense_runs"] == 1]
    print(f"(time: median of {args.repeats} alternating calls" + (f"; * dense at {', '.join(once)}: one call, "
          "the tracked one" if once else "") + ". max|dout|, max|dgrad|: segmented - dense, output and q/k/v "
          f"gradients; the output must agree within {TOLERANCE:g})")

    growth = exponents(rows)
    print(f"\nGrowth with sequence length, p in value ~ seq^p (packed rows, {' -> '.join(map(size, growth['seqs']))}):")
    for key, label in (("time/dense", "dense time"), ("time/segmented", "segmented time"),
                       ("memory/dense", "dense memory"), ("memory/segmented", "segmented memory"),
                       ("pairs/segmented", "segmented attended pairs")):
        g = growth[key]
        print(f"  {label:<26} {' then '.join(f'{p:.2f}' for p in g['steps'])}   (fit {g['fit']:.2f})")

    largest = max((r for r in rows if r["layout"] == "packed"), key=lambda r: r["seq"])
    exact = all(r["exact"] for r in rows)
    worst = max(r["max_abs_diff"]["out"] for r in rows)
    tag = f"{size(largest['seq'])} packed, mean doc {args.mean_doc / 1024:g}K"
    headline = [
        {"name": f"attention fwd+bwd time, segmented / dense, {tag}", "value": round(largest["time_ratio"], 4),
         "unit": "x", "target": "< 1", "met": largest["time_ratio"] < 1},
        {"name": f"attention peak memory, segmented / dense, {tag}", "value": round(largest["memory_ratio"], 4),
         "unit": "x", "target": "< 1", "met": largest["memory_ratio"] < 1},
        {"name": "segmented time growth exponent (fit over packed lengths)",
         "value": round(growth["time/segmented"]["fit"], 2), "unit": "", "target": "~1 (linear)", "met": None},
        {"name": "max |segmented - dense| attention output", "value": worst, "unit": "",
         "target": f"<= {TOLERANCE:g}", "met": exact},
    ]
    print(f"\n{wall:.0f} s; load average {load_start:.2f} at the start, {load_end:.2f} at the end")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "bench": "attention", "quick": args.quick, "headline": headline, "cases": rows, "growth": growth,
            "config": {"batch": 1, "dtype": "float32", "heads": args.heads, "kv_heads": args.kv_heads,
                       "head_dim": args.head_dim, "mean_doc": args.mean_doc, "dist": args.dist,
                       "sampling": args.sampling, "seed": args.seed,
                       "repeats": args.repeats, "dense_once_from": args.dense_once_from},
            "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                        "load_average_start": load_start, "load_average_end": load_end},
            "wall_s": wall}, indent=1) + "\n")
    if not exact:
        print(f"FAILED: segmented's output differs from dense by more than {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
