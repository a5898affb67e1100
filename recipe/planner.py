"""Capacity planning: memory per rank and step time of a 4D layout, and a ranking of layouts.

The paper chose its layouts (Table 4) with a memory estimator and a performance
projection. This is the same kind of model, written out so that each number can be
checked:

Memory: the peak of live tensor bytes of each pipeline rank during one training step
(AdamW's state already exists), the busiest rank reported. Every term below is what
autograd, FSDP2, the pipeline schedule or the loss actually keep, counted on the recipe's
own step; ``tests/test_planner_memory.py`` checks the sum against CPU runs under each
layout, with one document per row and with packed rows (within 10% per rank, most within
2%), and ``bench/gpu_memory.py`` compares it with CUDA's allocator on an 8B-shaped slice.
``c`` is the compute dtype's size (2 for bf16, 4 for fp32), ``P`` the rank's parameters
over TP, ``F`` the FSDP group (dp_shard x cp), ``T`` the tokens of one micro-batch on the
rank (``micro x seq / cp``), ``kv`` the K/V width ``n_kv_heads x head_dim``.

* state: fp32 parameters and AdamW's two moments, ``12 P / F``. Gradients add ``4 P / F``
  where they exist at the peak, i.e. once a micro-batch finished its backward before it
  (1F1B's steady state, gradient accumulation; not GPipe, nor a step of one micro-batch,
  whose peak comes before any gradient). FSDP does not reduce-scatter accumulating
  gradients (PP, or several micro-batches): it keeps them unsharded in fp32, ``4 P``;
* FSDP's unsharded copies (FSDP runs when dp x cp > 1 or with bf16): under PP the whole
  stage, ``c P``, gathered once for the step; without PP the output head, kept from its
  forward to its backward;
* activations a block saves for its backward, per token: the two RMSNorms' fp32 inputs
  and normalised values ``2 dim (4 + c) / tp`` (sequence-sharded under TP); their
  outputs as the projections see them, ``2 dim c`` - all-gathered, whole, under TP's
  sequence parallelism (DTensor keeps the gathered input of a column-parallel linear);
  q after RoPE and the attention output ``2 dim c / tp``; K and V at ``n_kv_heads``
  (GQA: no backend repeats them) over the whole sequence - under CP the all-gathered
  copy put in position order, which the kernels keep - ``2 kv c cp / tp``; the
  kernels' fp32 log-sum-exp and the norms' rsqrt ``(4 heads + 8) / tp``; SwiGLU's
  w1 x, silu, w3 x and product ``4 ffn c / tp``. The attention output is kept twice,
  ``dim c / tp`` more, where several kernel calls' outputs are concatenated (each call
  keeps its own for its backward): varlen under CP (one call per chunk; segmented
  attention on CPU writes all runs into one output); the backend is
  ``model.attention``, ``auto`` taken as a GPU runs it (varlen in bf16, segmented in
  fp32; the CPU runs segmented). No mask exists but for the dense reference backend:
  SDPA's float bias over every key per layer, ``seq c``, and the boolean mask once per
  micro-batch, ``seq`` bytes. A checkpointed block keeps its input, ``dim c / tp``, and
  one block is rebuilt at a time in the backward (the recompute buffer);
* the head (last stage): the final norm like a block's, and the fp32 log-softmax of the
  loss, ``4 vocab / tp`` per token;
* pipelines: each stage's output is kept until its backward (hidden states, or the logits
  on the last stage); every micro-batch of the step has a receive buffer for the stage's
  input and one for its output gradient;
* micro-batches in flight on pipeline rank ``r``: GPipe all of them, 1F1B ``pp - r``,
  interleaved 1F1B ``((v - 1) pp + 2 (pp - 1 - r) + 1) / v`` of the rank's layers
  (Narayanan et al., 2021), at most all of them;
* the backward's transient, at the worst of its moments: the loss backward (every
  activation alive, plus the log-softmax's gradient and the loss's own: ``8 vocab T``
  bytes, ``12 vocab T / tp`` for TP's vocabulary-parallel loss); a block's backward (its
  FFN's activation gradients, ``3 ffn c T / tp``; without PP, FSDP's current and
  prefetched blocks and the current block's unsharded gradients); FSDP's reduce-scatter
  of the head, of the last block and of the embedding (the unit's unsharded gradients,
  their fp32 copy that the collective sends, the shard it returns); the optimizer step
  (every gradient; AdamW's foreach implementation adds one fp32 copy of the parameters,
  the for-loop one two copies of the largest tensor, the fused one nothing).
* the RoPE table of every stage.

Not modelled: memory a kernel or a collective library allocates internally (gloo's
reduce-scatter, for one, flattens its whole input into one more copy; NCCL does not),
allocator fragmentation (the capacity is 95% of the GPU's memory), and the CUDA context.

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

from recipe.config import ATTENTION_BACKENDS
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
    reduce_every_micro_batch: bool = False  # FSDP reduce-scatter per micro-batch (no unsharded fp32 grads)

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def __str__(self) -> str:
        v = f" x{self.stages_per_rank} {self.schedule}" if self.pp > 1 else ""
        reduce = " reduce=every-micro-batch" if self.reduce_every_micro_batch and self.pp == 1 else ""
        return f"tp{self.tp} cp{self.cp} pp{self.pp}{v} dp{self.dp} ac={self.activation_checkpointing}{reduce}"


@dataclass
class Estimate:
    layout: Layout
    memory: dict[str, float] = field(default_factory=dict)  # bytes by component
    time: dict[str, float] = field(default_factory=dict)  # seconds by component
    fits: bool = True
    reason: str = ""
    pp_rank: int = 0  # the pipeline rank whose memory is reported

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def step_time(self) -> float:
        return sum(self.time.values())


def layer_params(args: ModelArgs) -> int:
    kv = args.n_kv_heads * args.head_dim
    return 2 * args.dim * args.dim + 2 * args.dim * kv + 3 * args.dim * args.ffn_hidden_dim + 2 * args.dim


@dataclass(frozen=True)
class RankShare:
    """What one pipeline rank holds: its virtual stages, their layers, and the ends of the model."""

    stages: tuple[int, ...]
    layers: tuple[int, ...]  # global layer indices
    n_stages: int  # virtual stages of the whole pipeline

    @property
    def embedding(self) -> bool:
        return 0 in self.stages

    @property
    def head(self) -> bool:
        return self.n_stages - 1 in self.stages


def rank_share(args: ModelArgs, layout: Layout, pp_rank: int = 0, first_last_fewer: bool = True) -> RankShare:
    from recipe.parallel.pipeline import split_layers, stage_ids_for_rank

    if layout.pp == 1:
        return RankShare((0,), tuple(range(args.n_layers)), 1)
    n_stages = layout.pp * layout.stages_per_rank
    split = split_layers(args.n_layers, n_stages, first_last_fewer)
    stages = tuple(stage_ids_for_rank(pp_rank, layout.pp, layout.stages_per_rank))
    return RankShare(stages, tuple(i for s in stages for i in split[s]), n_stages)


def share_params(args: ModelArgs, share: RankShare) -> int:
    """Parameters of a rank's stages (before TP and FSDP sharding)."""
    head = (args.dim + args.vocab_size * args.dim) if share.head else 0
    return len(share.layers) * layer_params(args) + share.embedding * args.vocab_size * args.dim + head


def rank_params(args: ModelArgs, layout: Layout, first_last_fewer: bool = True) -> tuple[int, int]:
    """``(parameters, layers)`` of the first pipeline rank, the one with the embedding (for the step time)."""
    share = rank_share(args, layout, 0, first_last_fewer)
    return share_params(args, share), len(share.layers)


def attention_backend(args: ModelArgs, precision: str, attention: str | None = None) -> str:
    """The attention backend whose memory is modelled: ``attention``, else ``args.attention``;
    ``auto`` is what it picks on a GPU (varlen in bf16, segmented in fp32)."""
    name = attention or args.attention
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "auto":
        return "varlen" if precision == "bf16" else "segmented"
    return name


def output_kept_twice(attention: str, cp: int) -> bool:
    """Whether a block keeps its attention output twice: the outputs of several kernel calls
    (saved by each call for its backward) and their concatenation (the output projection's input).

    Varlen calls its kernel per group of contiguous runs: one for a whole micro-batch, two
    per row under CP. Segmented attention, as the CPU runs it, writes every run into one
    output (one autograd node); on a GPU, where it is not the default, its per-run calls
    would keep the output twice too, which this model leaves out. Flex and dense attend a
    micro-batch in one call.
    """
    return attention == "varlen" and cp > 1


def layer_activation_bytes(args: ModelArgs, layout: Layout, compute_bytes: int, seq_len: int,
                           attention: str = "varlen") -> float:
    """Bytes one transformer block keeps for its backward pass, per token of the rank's sequence shard.

    ``attention``: a resolved backend (``attention_backend``). Packed rows cost no more than
    rows of one document: no backend but the dense reference builds a mask, and it builds
    one either way.
    """
    c, tp, cp, dim = compute_bytes, layout.tp, layout.cp, args.dim
    kv_dim = args.n_kv_heads * args.head_dim
    norms = 2 * dim * (4 + c) / tp  # each RMSNorm's fp32 input and normalised value, sequence-sharded under TP
    projection_inputs = 2 * dim * c  # the norms' outputs as the projections see them: whole, all-gathered over TP
    # q after RoPE and the attention output (also the output projection's input); K and V at
    # n_kv_heads (GQA, never repeated) over the whole sequence: under CP the all-gathered copy
    # put in position order, which the kernels keep; the kernels' fp32 log-sum-exp per query
    # head and the norms' two rsqrt.
    attn = (2 * dim * c + 2 * kv_dim * c * cp + 4 * args.n_heads + 2 * 4) / tp
    if output_kept_twice(attention, cp):
        attn += dim * c / tp
    feed_forward = 4 * args.ffn_hidden_dim * c / tp  # w1 x, silu(w1 x), w3 x and their product
    # The dense reference: SDPA's float bias of the boolean mask, every key per query, per
    # layer; one mask for all heads, so TP does not shard it. No other backend has a mask.
    mask = seq_len * c if attention == "dense" else 0.0
    return norms + projection_inputs + attn + feed_forward + mask


def head_activation_bytes(args: ModelArgs, layout: Layout, compute_bytes: int) -> float:
    """Bytes the final norm, the output head and the loss keep per token: the fp32 log-softmax dominates."""
    c, tp = compute_bytes, layout.tp
    return args.dim * (4 + c) / tp + args.dim * c + 4 * args.vocab_size / tp


def in_flight(layout: Layout, n_micro: int, pp_rank: int = 0) -> float:
    """Micro-batches whose activations pipeline rank ``pp_rank`` holds at its peak (in whole-rank units)."""
    if layout.pp == 1:
        return 1.0
    if layout.schedule in ("GPipe", "LoopedBFS"):
        return float(n_micro)
    p, v = layout.pp, layout.stages_per_rank
    if v == 1:
        return float(min(p - pp_rank, n_micro))
    # Interleaved 1F1B warms up with (v - 1) x p + 2 (p - 1 - rank) chunks (one stage's share
    # of a micro-batch each) and then holds one more (Narayanan et al., 2021).
    chunks = (v - 1) * p + 2 * (p - 1 - pp_rank) + 1
    return min(float(n_micro), chunks / v)


def _checkpointed(layout: Layout, layer: int) -> bool:
    mode = layout.activation_checkpointing
    return mode == "full" or (mode == "selective" and layer % layout.checkpoint_every_n == 0)


def rank_memory(args: ModelArgs, layout: Layout, pp_rank: int, seq_len: int, micro_batch: int, n_micro: int,
                precision: str, optimizer: str, first_last_fewer: bool,
                attention: str = "varlen") -> dict[str, float]:
    """Bytes by component of pipeline rank ``pp_rank`` at its peak (see the module docstring).

    ``attention``: the resolved backend (``attention_backend``).
    """
    c = 2 if precision == "bf16" else 4
    tp, cp = layout.tp, layout.cp
    share = rank_share(args, layout, pp_rank, first_last_fewer)
    params = share_params(args, share) / tp
    layer = layer_params(args) / tp
    head_params = (args.dim + args.vocab_size * args.dim) / tp if share.head else 0.0
    shard = (layout.dp_shard or layout.dp) * cp
    fsdp = layout.dp * cp > 1 or precision != "fp32"  # the strategy's rule for applying fully_shard
    tokens = micro_batch * seq_len / cp  # of one micro-batch on this rank
    flight = in_flight(layout, n_micro, pp_rank)
    grads_exist = flight < n_micro  # some micro-batch finished its backward before the peak
    # Accumulated without reduce-scatter: under PP always, otherwise unless reduced per micro-batch.
    unsharded_grads = fsdp and (layout.pp > 1 or (n_micro > 1 and not layout.reduce_every_micro_batch))

    # What every moment of the backward pass holds.
    base: dict[str, float] = {}
    base["sharded params+grads+adam"] = (12 + 4 * (grads_exist and not unsharded_grads)) * params / shard
    base["buffers"] = layout.stages_per_rank * args.max_seq_len * args.head_dim * 4  # the RoPE table per stage
    if fsdp and layout.pp > 1:
        base["unsharded params"] = c * params  # gathered once, kept for the whole step
    if grads_exist and unsharded_grads:
        base["unsharded grads"] = 4 * params  # FSDP accumulates them in fp32
    full = layer_activation_bytes(args, layout, c, seq_len, attention) * tokens
    kept_input = args.dim * c / tp * tokens  # all a checkpointed block keeps
    saved = {i: kept_input if _checkpointed(layout, i) else full for i in share.layers}
    per_micro = sum(saved.values())
    if attention == "dense":  # the boolean [micro, 1, seq / cp, seq] mask, built once per micro-batch
        per_micro += seq_len * tokens
    if layout.pp > 1:
        # The schedule keeps each stage's output until its backward: hidden states, or the
        # logits on the last stage. A later stage's input is a receive buffer, which in fp32
        # is the first block's saved input itself.
        boundary = args.dim * c / tp * tokens
        outputs = sum(1 for s in share.stages if s < share.n_stages - 1)
        inputs = sum(1 for s in share.stages if s > 0)
        per_micro += (outputs * boundary + share.head * c * args.vocab_size / tp * tokens
                      - (c == 4) * inputs * boundary) / layout.stages_per_rank
        base["pipeline buffers"] = n_micro * (inputs + outputs) * boundary  # received activations and gradients
    if any(_checkpointed(layout, i) for i in share.layers):
        base["recompute buffer"] = full  # one block's activations rebuilt at a time
    head = head_activation_bytes(args, layout, c) * tokens if share.head else 0.0
    acts = (per_micro + head) * flight

    # The loss backward (last stage): every activation, the head's unsharded weights, and the
    # gradients of the fp32 log-softmax (2 logits-sized tensors; 3 for TP's vocabulary-parallel loss).
    loss = {**base, "activations": acts}
    if share.head:
        if fsdp and layout.pp == 1:
            loss["unsharded params"] = c * head_params
        loss["backward working set"] = (12 if tp > 1 else 8) * args.vocab_size / tp * tokens
    # A block's backward: the head's activations are gone and its gradient exists; FSDP holds
    # this block and the prefetched next one unsharded, and this block's unsharded gradients.
    block = {**base, "activations": acts - head}
    if fsdp and layout.pp == 1:
        block["unsharded params"] = 2 * c * layer
        block["unsharded grads"] = block.get("unsharded grads", 0.0) + c * layer
        if not grads_exist:
            block["sharded params+grads+adam"] += 4 * head_params / shard
    block["backward working set"] = 3 * args.ffn_hidden_dim * c / tp * tokens  # the FFN's activation gradients
    moments = [loss, block]
    if fsdp and layout.pp == 1:
        # FSDP reduce-scatters each unit's gradients after its backward: the unit's unsharded
        # gradients, their fp32 copy the collective sends and the shard it returns, with the
        # next block prefetched. The head (first, most activations left), the last block, and
        # the embedding (last, every other gradient done) bound the sequence.
        embedding = args.vocab_size * args.dim / tp
        last = saved[share.layers[-1]]
        for unit, left, done in ((head_params, acts - head, 0.0), (layer, acts - head - last, head_params),
                                 (embedding, 0.0, params - embedding)):
            moment = {**base, "activations": left, "unsharded params": c * layer if left else 0.0,
                      "reduce-scatter buffers": (c + 4 + 4 / shard) * unit}
            if not unsharded_grads:
                moment["sharded params+grads+adam"] += 4 * done / shard
            moments.append(moment)
    # The optimizer step: every gradient exists, activations are gone. AdamW's temporaries:
    # foreach (torch's default on GPUs) one fp32 copy of the parameters, the for-loop
    # (its default on CPUs) two of the largest tensor, fused none.
    largest = max(args.vocab_size * args.dim, args.dim * args.ffn_hidden_dim, args.dim * args.dim) / tp
    temporaries = {"foreach": 4 * params, "for-loop": 8 * largest, "fused": 0.0}[optimizer] / shard
    moments.append({"sharded params+grads+adam": 16 * params / shard, "buffers": base["buffers"],
                    "pipeline buffers": base.get("pipeline buffers", 0.0), "optimizer temporaries": temporaries})
    return max(moments, key=lambda m: sum(m.values()))


def estimate(args: ModelArgs, layout: Layout, seq_len: int, batch_tokens: int, micro_batch: int = 1,
             hardware: Hardware = HARDWARE["h100-80gb"], precision: str = "bf16", mfu: float = 0.4,
             first_last_fewer: bool = True, optimizer: str = "foreach",
             pp_rank: int | None = None, attention: str | None = None) -> Estimate:
    """Memory of the busiest rank and step time of ``layout`` (see the module docstring).

    ``optimizer``: AdamW's implementation, "foreach" (torch's default on GPUs), "for-loop"
    (its default on CPUs) or "fused". ``attention``: the backend (default ``args.attention``; ``auto`` as on a
    GPU, see ``attention_backend``). ``pp_rank``: the pipeline rank to report (default: the
    one with the most memory).
    """
    if precision not in ("bf16", "fp32") or optimizer not in ("foreach", "for-loop", "fused"):
        raise ConfigError(f"precision must be bf16 or fp32 and optimizer foreach, for-loop or fused, got "
                          f"{precision!r} and {optimizer!r}")
    backend = attention_backend(args, precision, attention)
    if pp_rank is not None and not 0 <= pp_rank < layout.pp:
        raise ConfigError(f"pp_rank={pp_rank} is outside 0..{layout.pp - 1}")
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
    ranks = range(layout.pp) if pp_rank is None else [pp_rank]
    per_rank = {r: rank_memory(args, layout, r, seq_len, micro_batch, n_micro, precision, optimizer,
                               first_last_fewer, backend) for r in ranks}
    est.pp_rank = max(per_rank, key=lambda r: sum(per_rank[r].values()))
    est.memory = per_rank[est.pp_rank]
    capacity = hardware.memory_bytes * 0.95  # allocator fragmentation and workspace
    if est.memory_total > capacity:
        biggest = max(est.memory, key=est.memory.get)
        est.fits = False
        est.reason = (f"needs {est.memory_total / GIB:.1f} GiB per GPU, over {capacity / GIB:.1f} GiB; the largest part "
                      f"is {biggest} ({est.memory[biggest] / GIB:.1f} GiB)")

    params, layers = rank_params(args, layout, first_last_fewer)
    fsdp = (layout.dp_shard or layout.dp) * layout.cp
    tokens = micro_batch * seq_len / layout.cp
    checkpointed = {"full": layers, "selective": layers // layout.checkpoint_every_n}.get(
        layout.activation_checkpointing, 0)
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
    # Parameters are gathered once per step under PP (kept unsharded), twice per
    # micro-batch without it (forward and backward, resharded after each); gradients are
    # reduce-scattered in fp32 once per step, or once per micro-batch when asked to.
    gathers = 1 if layout.pp > 1 else 2 * n_micro
    reduces = n_micro if layout.reduce_every_micro_batch and layout.pp == 1 else 1
    fsdp_bytes = (gathers * compute_bytes + 4 * reduces) * params / layout.tp * (fsdp - 1) / fsdp
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
    if est.layout.pp > 1:
        lines.append(f"  memory of pipeline rank {est.pp_rank}, the busiest")
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

    The batch is the ramp's (or the data's) final one, the largest the run reaches; with
    context-length stages, the sequence is their last (longest) one, with its own batch
    where it sets one - the most memory per rank the run needs.
    """
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    seq_len = int(data.get("seq_len", 256))
    batch_tokens = int(data.get("global_batch_size", 16)) * seq_len
    callbacks = [(str(cb.get("class_path", "")), cb.get("init_args") or {}) for cb in trainer.get("callbacks") or []]
    for path, init in callbacks:
        if path.endswith("BatchSizeRamp"):
            last = init.get("stages", [])[-1]
            seq_len, batch_tokens = int(last["seq_len"]), int(last["batch_tokens"])
    for path, init in callbacks:
        if path.endswith("ContextLengthStages"):
            from recipe.plan import paper_stages

            stages = init.get("stages") or [vars(s) for s in paper_stages()]
            last = stages[-1]
            seq_len = int(last["seq_len"])
            batch_tokens = int(last.get("batch_tokens") or batch_tokens)
    strategy = trainer.get("strategy") or {}
    sizes = strategy.get("init_args") or {} if isinstance(strategy, dict) else {}
    gpus = int(trainer.get("devices", 1) if str(trainer.get("devices", 1)).isdigit() else 1) * \
        int(trainer.get("num_nodes", 1))
    tp, cp, pp = int(sizes.get("tp", 1)), int(sizes.get("cp", 1)), int(sizes.get("pp", 1))
    layout = Layout(tp=tp, cp=cp, pp=pp, dp=max(1, gpus // (tp * cp * pp)),
                    stages_per_rank=int(sizes.get("pp_stages_per_rank", 1)),
                    schedule=str(sizes.get("pp_schedule", "1F1B")),
                    activation_checkpointing=str(sizes.get("activation_checkpointing", "none")),
                    checkpoint_every_n=int(sizes.get("activation_checkpointing_every_n", 2)),
                    reduce_every_micro_batch=bool(sizes.get("reduce_every_micro_batch", False)))
    return layout, seq_len, batch_tokens, int(data.get("micro_batch_size", 1)), str(sizes.get("precision", "fp32"))


def main(argv: list[str]) -> int:
    import argparse
    from dataclasses import replace
    from pathlib import Path

    import yaml

    from recipe.model_info import model_args_from_config

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
