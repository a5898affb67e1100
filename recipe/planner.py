"""Capacity planning: memory per rank and step time of a 4D layout, and a ranking of layouts.

The paper chose its layouts (Table 4) with a memory estimator and a performance
projection. This is the same kind of model, written out so that each number can be
checked:

Memory of the busiest rank (the first pipeline rank: it holds the embedding and the
most micro-batches in flight), in bytes:

* sharded state: fp32 parameters, fp32 gradients and AdamW's two fp32 moments, 16 bytes
  per parameter of the rank's stages, divided by TP and by the FSDP group
  (dp_shard x cp);
* unsharded compute copies: FSDP all-gathers the parameters it computes with (bf16 or
  fp32, per TP shard). With pipeline parallelism the whole stage stays unsharded for the
  step, as in the paper. Without it two layers are live at a time (the current one and
  the prefetched one). The backward pass also holds two layers' unsharded gradients;
* activations saved for the backward pass, per layer and token, in the compute dtype:
  ``8 x dim + 4 x kv_dim + 4 x ffn`` values (norm inputs and outputs, q/k/v before and
  after RoPE, the attention output, the SwiGLU's w1, w3, silu and product), divided by TP
  (sequence parallelism shards the norm regions too) and by CP (each rank holds
  ``seq_len / cp`` tokens). A checkpointed block keeps only its input. The tokens are
  ``micro_batch x seq_len / cp`` per micro-batch;
* micro-batches in flight on the first pipeline rank: GPipe all of them, 1F1B ``pp``,
  interleaved 1F1B ``pp x (1 + (pp - 1) / (pp x v))`` (Narayanan et al., 2021);
* the output logits in fp32 on the last stage (counted on the busiest rank too, as the
  bound), twice: the logits and their gradient;
* context parallelism's gathered keys and values of one layer (the full sequence).

Step time: model FLOPs at an assumed MFU, plus the pipeline bubble
``(pp - 1) / (v x micro-batches)``, plus the recompute of checkpointed blocks (a forward
pass is a third of the training FLOPs), plus the communication that does not overlap
compute: TP's all-gathers and reduce-scatters within the node, CP's key/value gathers,
and PP's point-to-point sends. FSDP's traffic overlaps compute and only counts where it
exceeds it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from recipe.errors import ConfigError
from recipe.flops import flops_per_token
from recipe.model import ModelArgs

GIB = 1024**3


@dataclass(frozen=True)
class Hardware:
    memory_bytes: float
    peak_flops: float  # dense bf16 FLOP/s
    intra_node_bytes_per_s: float  # per GPU, one direction (NVLink)
    inter_node_bytes_per_s: float  # per GPU, one direction (network)
    gpus_per_node: int = 8


HARDWARE: dict[str, Hardware] = {
    # 400 Gb/s RoCE/InfiniBand per GPU, as in the paper's clusters.
    "h100-80gb": Hardware(80 * 1e9, 989e12, 450e9, 50e9),
    "h200-141gb": Hardware(141 * 1e9, 989e12, 450e9, 50e9),
    "a100-80gb": Hardware(80 * 1e9, 312e12, 300e9, 25e9),
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1  # data-parallel ranks (replicas x shards)
    dp_shard: int | None = None  # FSDP group inside dp (None: all of dp)
    stages_per_rank: int = 1
    schedule: str = "1F1B"
    activation_checkpointing: str = "none"  # none | selective | full
    checkpoint_every_n: int = 2

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def __str__(self) -> str:
        v = f" x{self.stages_per_rank} {self.schedule}" if self.pp > 1 else ""
        return f"tp{self.tp} cp{self.cp} pp{self.pp}{v} dp{self.dp} ac={self.activation_checkpointing}"


@dataclass
class Estimate:
    layout: Layout
    memory: dict[str, float] = field(default_factory=dict)  # bytes by component
    time: dict[str, float] = field(default_factory=dict)  # seconds by component
    fits: bool = True
    reason: str = ""

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def step_time(self) -> float:
        return sum(self.time.values())


def layer_params(args: ModelArgs) -> int:
    kv = args.n_kv_heads * args.head_dim
    return 2 * args.dim * args.dim + 2 * args.dim * kv + 3 * args.dim * args.ffn_hidden_dim + 2 * args.dim


def rank_params(args: ModelArgs, layout: Layout, first_last_fewer: bool = True) -> tuple[int, int]:
    """``(parameters, layers)`` of the first pipeline rank, the one with the embedding."""
    from recipe.parallel.pipeline import split_layers, stage_ids_for_rank

    embedding = args.vocab_size * args.dim
    if layout.pp == 1:
        return embedding + args.n_layers * layer_params(args) + args.dim + args.vocab_size * args.dim, args.n_layers
    n_stages = layout.pp * layout.stages_per_rank
    split = split_layers(args.n_layers, n_stages, first_last_fewer)
    layers = sum(len(split[s]) for s in stage_ids_for_rank(0, layout.pp, layout.stages_per_rank))
    return embedding + layers * layer_params(args), layers


def activation_bytes_per_token_layer(args: ModelArgs, layout: Layout, dtype_bytes: int) -> float:
    values = 8 * args.dim + 4 * args.n_kv_heads * args.head_dim + 4 * args.ffn_hidden_dim
    return values * dtype_bytes / layout.tp


def in_flight(layout: Layout, n_micro: int) -> float:
    """Micro-batches whose activations the first pipeline rank holds at its peak."""
    if layout.pp == 1:
        return 1.0
    if layout.schedule == "GPipe":
        return float(n_micro)
    p, v = layout.pp, layout.stages_per_rank
    if v == 1:
        return float(min(p, n_micro))
    return min(float(n_micro), p * (1 + (p - 1) / (p * v)))


def estimate(args: ModelArgs, layout: Layout, seq_len: int, batch_tokens: int, micro_batch: int = 1,
             hardware: Hardware = HARDWARE["h100-80gb"], precision: str = "bf16", mfu: float = 0.4,
             first_last_fewer: bool = True) -> Estimate:
    """Memory of the busiest rank and step time of ``layout`` (see the module docstring)."""
    est = Estimate(layout)
    compute_bytes = 2 if precision == "bf16" else 4
    batch = batch_tokens // seq_len
    if batch * seq_len != batch_tokens or batch % layout.dp:
        est.fits, est.reason = False, f"{batch} sequences per step do not split over dp={layout.dp}"
        return est
    n_micro = batch // layout.dp // micro_batch
    if n_micro < 1 or (layout.pp > 1 and n_micro < layout.pp):
        est.fits, est.reason = False, f"{n_micro} micro-batches per step, fewer than pp={layout.pp}"
        return est
    params, layers = rank_params(args, layout, first_last_fewer)
    fsdp = (layout.dp_shard or layout.dp) * layout.cp
    est.memory["sharded params+grads+adam"] = 16 * params / layout.tp / fsdp
    live_layers = layers if layout.pp > 1 else 2
    est.memory["unsharded params"] = compute_bytes * live_layers * layer_params(args) / layout.tp
    if layout.pp > 1:
        est.memory["unsharded params"] += compute_bytes * args.vocab_size * args.dim / layout.tp
    est.memory["unsharded grads"] = (compute_bytes + 4) * 2 * layer_params(args) / layout.tp
    tokens = micro_batch * seq_len / layout.cp
    full = activation_bytes_per_token_layer(args, layout, compute_bytes) * tokens
    kept_input = args.dim * compute_bytes / layout.tp * tokens
    if layout.activation_checkpointing == "full":
        checkpointed = layers
    elif layout.activation_checkpointing == "selective":
        checkpointed = layers // layout.checkpoint_every_n
    else:
        checkpointed = 0
    per_micro = (layers - checkpointed) * full + checkpointed * kept_input
    est.memory["activations"] = per_micro * in_flight(layout, n_micro)
    if checkpointed:
        est.memory["recompute buffer"] = full  # one block's activations rebuilt at a time
    est.memory["logits (fp32)"] = 2 * tokens * args.vocab_size / layout.tp * 4
    if layout.cp > 1:
        est.memory["cp gathered k/v"] = 2 * micro_batch * seq_len * args.n_kv_heads * args.head_dim * compute_bytes \
            / layout.tp
    capacity = hardware.memory_bytes * 0.95  # allocator fragmentation and workspace
    if est.memory_total > capacity:
        biggest = max(est.memory, key=est.memory.get)
        est.fits = False
        est.reason = (f"needs {est.memory_total / GIB:.1f} GiB per GPU, over {capacity / GIB:.1f} GiB; the largest part "
                      f"is {biggest} ({est.memory[biggest] / GIB:.1f} GiB)")

    gpus = layout.gpus
    flops = flops_per_token(args, seq_len) * batch_tokens
    compute = flops / (gpus * hardware.peak_flops * mfu)
    est.time["compute"] = compute
    if layout.pp > 1:
        est.time["pipeline bubble"] = compute * (layout.pp - 1) / (layout.stages_per_rank * n_micro)
    if checkpointed:
        est.time["recompute"] = compute / 3 * checkpointed / layers
    total_layers_per_rank = args.n_layers / layout.pp
    if layout.tp > 1:
        tp_bytes = 8 * tokens * args.dim * compute_bytes * (layout.tp - 1) / layout.tp
        est.time["tp comm"] = tp_bytes * total_layers_per_rank * n_micro / hardware.intra_node_bytes_per_s
    cross_node = layout.tp * layout.cp > hardware.gpus_per_node
    if layout.cp > 1:
        kv = 2 * micro_batch * seq_len * args.n_kv_heads * args.head_dim * compute_bytes / layout.tp
        bw = hardware.inter_node_bytes_per_s if cross_node else hardware.intra_node_bytes_per_s
        est.time["cp comm"] = 2 * kv * (layout.cp - 1) / layout.cp * total_layers_per_rank * n_micro / bw
    if layout.pp > 1:
        boundary = tokens * args.dim * compute_bytes / layout.tp
        est.time["pp comm"] = 2 * boundary * layout.stages_per_rank * n_micro / hardware.inter_node_bytes_per_s
    # Parameters are gathered once per step under PP (kept unsharded), twice without it
    # (forward and backward); gradients are reduce-scattered once, in fp32.
    gathers = 1 if layout.pp > 1 else 2
    fsdp_bytes = (gathers * compute_bytes + 4) * params / layout.tp * (fsdp - 1) / fsdp
    est.time["fsdp comm (exposed)"] = max(0.0, fsdp_bytes / hardware.inter_node_bytes_per_s - compute)
    return est


def candidates(args: ModelArgs, gpus: int, seq_len: int, batch_tokens: int, micro_batch: int = 1,
               hardware: Hardware = HARDWARE["h100-80gb"], **kwargs) -> list[Estimate]:
    """Every layout of ``gpus`` GPUs, feasible ones first, fastest first."""
    if gpus < 1 or batch_tokens < seq_len:
        raise ConfigError(f"need gpus >= 1 and batch_tokens >= seq_len, got {gpus} and {batch_tokens}")
    found = []
    powers = [2**i for i in range(int(math.log2(gpus)) + 1)]
    for tp, cp, pp in itertools.product(powers, powers, powers):
        if gpus % (tp * cp * pp) or tp > hardware.gpus_per_node:
            continue
        if args.n_heads % tp or args.n_kv_heads % tp or seq_len % (2 * cp * tp) or pp > args.n_layers // 2:
            continue
        for v, schedule in ([(1, "1F1B")] if pp == 1 else [(1, "1F1B"), (2, "Interleaved1F1B")]):
            if pp * v > args.n_layers // 2:
                continue
            for ac in ("none", "selective", "full"):
                layout = Layout(tp=tp, cp=cp, pp=pp, dp=gpus // (tp * cp * pp), stages_per_rank=v, schedule=schedule,
                                activation_checkpointing=ac)
                found.append(estimate(args, layout, seq_len, batch_tokens, micro_batch, hardware, **kwargs))
    return sorted(found, key=lambda e: (not e.fits, e.step_time if e.fits else e.memory_total))


def describe(est: Estimate, hardware: Hardware) -> str:
    lines = [f"{est.layout}: {'fits' if est.fits else 'does not fit'}"
             + (f" - {est.reason}" if est.reason else "")]
    for name, value in est.memory.items():
        lines.append(f"  memory  {name:<28}{value / GIB:9.2f} GiB")
    lines.append(f"  memory  {'total':<28}{est.memory_total / GIB:9.2f} GiB of {hardware.memory_bytes / GIB:.1f}")
    for name, value in est.time.items():
        lines.append(f"  time    {name:<28}{value:9.3f} s")
    if est.time:
        lines.append(f"  time    {'step':<28}{est.step_time:9.3f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def config_layout(config: dict) -> tuple[Layout, int, int, int, str]:
    """``(layout, seq_len, batch_tokens, micro_batch, precision)`` a ``recipe fit`` YAML trains with last.

    The batch is the ramp's (or the data's) final one, the largest the run reaches.
    """
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    seq_len = int(data.get("seq_len", 256))
    batch_tokens = int(data.get("global_batch_size", 16)) * seq_len
    for cb in trainer.get("callbacks") or []:
        if str(cb.get("class_path", "")).endswith("BatchSizeRamp"):
            last = (cb.get("init_args") or {}).get("stages", [])[-1]
            seq_len, batch_tokens = int(last["seq_len"]), int(last["batch_tokens"])
    strategy = trainer.get("strategy") or {}
    sizes = strategy.get("init_args") or {} if isinstance(strategy, dict) else {}
    gpus = int(trainer.get("devices", 1) if str(trainer.get("devices", 1)).isdigit() else 1) * \
        int(trainer.get("num_nodes", 1))
    tp, cp, pp = int(sizes.get("tp", 1)), int(sizes.get("cp", 1)), int(sizes.get("pp", 1))
    layout = Layout(tp=tp, cp=cp, pp=pp, dp=max(1, gpus // (tp * cp * pp)),
                    stages_per_rank=int(sizes.get("pp_stages_per_rank", 1)),
                    schedule=str(sizes.get("pp_schedule", "1F1B")),
                    activation_checkpointing=str(sizes.get("activation_checkpointing", "none")),
                    checkpoint_every_n=int(sizes.get("activation_checkpointing_every_n", 2)))
    return layout, seq_len, batch_tokens, int(data.get("micro_batch_size", 1)), str(sizes.get("precision", "fp32"))


def main(argv: list[str]) -> int:
    import argparse
    from dataclasses import replace
    from pathlib import Path

    import yaml

    from recipe.cli import model_args_from_config

    parser = argparse.ArgumentParser(prog="recipe plan", description="memory and step time of 4D layouts")
    parser.add_argument("--config", required=True, help="a recipe fit YAML (model, data, strategy, ramp)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: the config's)")
    parser.add_argument("--gpu", default="h100-80gb", choices=sorted(HARDWARE), help="GPU type")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the config's last)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="tokens per step (default: the config's last)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default: 0.4)")
    parser.add_argument("--top", type=int, default=5, help="fastest feasible layouts to list (default: 5)")
    args = parser.parse_args(argv)
    model = model_args_from_config(args.config)
    config = yaml.safe_load(Path(args.config).read_text()) or {}
    layout, seq_len, batch_tokens, micro, precision = config_layout(config)
    seq_len = args.seq_len or seq_len
    batch_tokens = args.batch_tokens or batch_tokens
    hardware = HARDWARE[args.gpu]
    gpus = args.gpus or layout.gpus
    if args.gpus and args.gpus % (layout.tp * layout.cp * layout.pp) == 0:
        layout = replace(layout, dp=args.gpus // (layout.tp * layout.cp * layout.pp))
    print(f"{args.config}: {seq_len:,}-token sequences, {batch_tokens:,} tokens per step, {gpus:,} x {args.gpu}, "
          f"{precision}, MFU {args.mfu:.0%}\n")
    if layout.gpus == gpus:
        print("the config's layout")
        print(describe(estimate(model, layout, seq_len, batch_tokens, micro, hardware, precision, args.mfu),
                       hardware) + "\n")
    ranked = candidates(model, gpus, seq_len, batch_tokens, micro, hardware, precision=precision, mfu=args.mfu)
    feasible = [e for e in ranked if e.fits]
    print(f"{len(feasible)} of {len(ranked)} layouts fit; the fastest:")
    for est in feasible[: args.top]:
        print(f"  {est.step_time:8.2f} s/step  {est.memory_total / GIB:6.1f} GiB  {est.layout}")
    if not feasible:
        print("  none - the closest: " + (ranked[0].reason if ranked else "no layout divides the GPUs"))
    return 0
