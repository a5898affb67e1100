"""Document-masked causal attention without a dense mask: one plan per micro-batch, four backends.

Llama 3 trains on rows of packed documents: a token attends to the earlier tokens of its own
document only. Documents are contiguous in a row, so that rule is a set of *runs*: a run is
a stretch of consecutive query positions inside one document, and it attends to the keys
from its document's first position up to its own last position (causal, aligned at the
bottom right: the last query of the run sees every key of the range). Without context
parallelism a run is a whole document; under context parallelism a rank's queries are two
chunks of the row (see ``recipe/parallel/context.py``), so a run may start after its
document does and then also sees the document's earlier keys.

``AttentionPlan`` computes the runs once per micro-batch, on the host, from document ids
that never left the host (the data module keeps them there), so no forward waits on the
GPU. Every attention layer of the forward reuses it. Backends (``model.attention``):

``segmented``  exact on any device, no seq x seq tensor: a flash call (GQA without K/V
               copies) per run, one batched causal call when every row is one document. A
               run that starts inside its document merges a mask-free prefix call and a
               causal call by their log-sum-exp (CPU), or uses SDPA's lower-right causal
               bias elsewhere. On CPU all runs form one autograd node.
``varlen``     CUDA, bf16/fp16: torch's flash ``varlen_attn`` over cumulative run lengths.
``flex``       FlexAttention with a block mask built from the runs (compiled on GPUs; on CPU
               torch has no FlexAttention backward, so it serves inference and tests only).
``dense``      SDPA with a materialised ``[batch, 1, q, kv]`` boolean mask: the reference
               the others are tested against, never chosen by ``auto``.
``auto``       varlen on CUDA in bf16/fp16 (segmented's batched causal call when every row
               is one document), segmented otherwise.

Document ids must be contiguous per document within a row (as the packer writes them);
the dense reference compares ids, the others their runs, which agree on such rows.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from recipe.config import ATTENTION_BACKENDS
from recipe.errors import ModelConfigError

log = logging.getLogger(__name__)

# Columns of ``AttentionPlan.runs``: row, first and end query index (local), first and end key.
ROW, Q_START, Q_END, K_START, K_END = range(5)


def document_causal_mask(doc_ids: torch.Tensor, kv_doc_ids: torch.Tensor | None = None,
                         q_positions: torch.Tensor | None = None,
                         kv_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``[batch, 1, q_len, kv_len]``: causal and same-document (the dense reference).

    Explicit positions let queries at some positions (a context-parallel shard, decoding
    after a cache) be masked against keys at others.
    """
    kv_doc_ids = doc_ids if kv_doc_ids is None else kv_doc_ids
    if q_positions is None:
        q_positions = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    if kv_positions is None:
        kv_positions = torch.arange(kv_doc_ids.shape[1], device=doc_ids.device)
    causal = q_positions.unsqueeze(-1) >= kv_positions.unsqueeze(-2)
    same_doc = doc_ids.unsqueeze(-1) == kv_doc_ids.unsqueeze(-2)
    return (same_doc & causal).unsqueeze(1)


def host_to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host array to ``device`` without making the host wait for the device's queue."""
    tensor = torch.as_tensor(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def document_runs(doc_ids: np.ndarray, q_positions: np.ndarray) -> np.ndarray:
    """``[n_runs, 5]`` int64 (row, q_start, q_end, k_start, k_end), in row-major query order.

    ``doc_ids``: ``[batch, kv_len]`` of the keys (positions 0..kv_len-1); ``q_positions``:
    ``[q_len]`` position of each query, the same for every row.
    """
    batch, kv_len = doc_ids.shape
    q_len = q_positions.shape[0]
    new_doc = np.ones((batch, kv_len), dtype=bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # First position of the document holding each key: the running max of document starts.
    doc_start = np.maximum.accumulate(np.where(new_doc, np.arange(kv_len), 0), axis=1)
    q_doc_start = doc_start[:, q_positions]
    breaks = np.ones((batch, q_len), dtype=bool)
    breaks[:, 1:] = (q_positions[1:] != q_positions[:-1] + 1)[None] | (q_doc_start[:, 1:] != q_doc_start[:, :-1])
    rows, starts = np.nonzero(breaks)
    ends = np.empty_like(starts)
    ends[:-1] = np.where(rows[1:] == rows[:-1], starts[1:], q_len)
    ends[-1:] = q_len
    return np.stack([rows, starts, ends, q_doc_start[rows, starts], q_positions[ends - 1] + 1], axis=1)


class AttentionPlan:
    """Where every query of one micro-batch attends: built once, used by every layer.

    ``doc_ids``: host ``[batch, kv_len]`` document id of each key position (the whole rows,
    also under context parallelism, where the keys are all-gathered); ``q_positions``: host
    ``[q_len]`` positions of this rank's queries (None: all of them, ``0..kv_len-1``).
    Device-side pieces (positions, cumulative lengths, block masks) are made on first use
    and cached, so the layers after the first reuse them.

    A pytree node whose one leaf is ``doc_ids``: the pipeline schedule splits it by rows
    into one plan per micro-batch, like the tensors it travels with, while FSDP and DDP,
    which move tensors they can see onto the device, pass it through untouched.
    """

    def __init__(self, doc_ids: torch.Tensor | np.ndarray, q_positions: np.ndarray | torch.Tensor | None = None) -> None:
        if isinstance(doc_ids, torch.Tensor) and doc_ids.device.type != "cpu":
            raise ValueError("AttentionPlan takes document ids on the host; build it before moving a batch to the "
                             "device (AttentionPlan.from_inputs copies device ids, which waits for the device)")
        self.doc_ids = torch.as_tensor(doc_ids)
        if self.doc_ids.dim() != 2:
            raise ValueError(f"document ids must be [batch, seq], got shape {tuple(self.doc_ids.shape)}")
        kv_len = self.doc_ids.shape[1]
        if q_positions is None:
            q_positions = np.arange(kv_len)
        self.q_positions = np.asarray(q_positions, dtype=np.int64).reshape(-1)
        if self.q_positions.size and (self.q_positions.min() < 0 or self.q_positions.max() >= kv_len):
            raise ValueError(f"query positions must lie in [0, {kv_len}) (the document ids' length)")
        self._device_cache: dict[tuple, Any] = {}

    @classmethod
    def from_inputs(cls, batch: int, q_len: int, doc_ids: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None) -> AttentionPlan:
        """The plan of a direct model call: ``doc_ids`` (None: one document per row) and
        ``positions`` of the queries (None: ``0..q_len-1``). Device tensors are copied to the
        host, which waits for the device: training builds its plans from host ids instead."""
        if positions is not None:
            positions = positions.detach().reshape(-1, positions.shape[-1])[0].cpu().numpy()
        if doc_ids is None:
            kv_len = int(positions.max()) + 1 if positions is not None and positions.size else q_len
            doc_ids = torch.zeros(batch, kv_len, dtype=torch.long)
        return cls(doc_ids.detach().cpu(), positions)

    # ------------------------------------------------------------------ shape

    @property
    def batch(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def q_len(self) -> int:
        return self.q_positions.shape[0]

    @property
    def kv_len(self) -> int:
        return self.doc_ids.shape[1]

    @functools.cached_property
    def runs(self) -> np.ndarray:
        return document_runs(self.doc_ids.numpy(), self.q_positions)

    @functools.cached_property
    def same_runs_every_row(self) -> bool:
        """Every row has the same runs (e.g. one document per row): one call covers all rows."""
        runs = self.runs
        if len(runs) % self.batch:
            return False
        per_row = runs.reshape(self.batch, -1, 5)  # runs are in row-major order
        return bool((per_row[:, :, ROW] == np.arange(self.batch)[:, None]).all()
                    and (per_row[:, :, Q_START:] == per_row[:1, :, Q_START:]).all())

    @functools.cached_property
    def whole_rows(self) -> bool:
        """Every row is one document and every position a query: plain causal attention."""
        return (self.q_len == self.kv_len and len(self.runs) == self.batch
                and bool((self.runs[:, Q_START] == 0).all() and (self.runs[:, K_START] == 0).all()))

    def positions(self, device: torch.device) -> torch.Tensor:
        """``[q_len]`` query positions on ``device`` (to index the RoPE table)."""
        return self._cached(("positions", device), lambda: host_to_device(self.q_positions, device))

    def _cached(self, key: tuple, build: Any) -> Any:
        if key not in self._device_cache:
            self._device_cache[key] = build()
        return self._device_cache[key]

    def __repr__(self) -> str:
        return f"AttentionPlan(batch={self.batch}, q_len={self.q_len}, kv_len={self.kv_len}, runs={len(self.runs)})"


def _flatten_plan(plan: AttentionPlan) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    # A tuple context: tree specs are compared with ==, which an array would not survive.
    return [plan.doc_ids], tuple(plan.q_positions.tolist())


def _unflatten_plan(leaves: list[Any], q_positions: tuple[int, ...]) -> AttentionPlan:
    # No validation: pytree utilities also rebuild the node around non-tensor leaves (the
    # pipeline schedule maps chunk specs over the keywords).
    plan = AttentionPlan.__new__(AttentionPlan)
    plan.doc_ids, plan.q_positions, plan._device_cache = leaves[0], np.asarray(q_positions, dtype=np.int64), {}
    return plan


pytree.register_pytree_node(AttentionPlan, _flatten_plan, _unflatten_plan,
                            serialized_type_name="recipe.attention.AttentionPlan")


# ----------------------------------------------------------------------------- backends


def resolve_backend(name: str, plan: AttentionPlan, q: torch.Tensor) -> str:
    """The backend that runs: ``auto`` picked for the device and dtype, others checked."""
    if name not in ATTENTION_BACKENDS:
        raise ModelConfigError(f"model.attention={name!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    fast_dtype = q.dtype in (torch.bfloat16, torch.float16)
    if name == "auto":
        if q.device.type == "cuda" and fast_dtype and varlen_available() and not plan.whole_rows:
            return "varlen"
        return "segmented"
    if name == "varlen" and not (q.device.type == "cuda" and fast_dtype and varlen_available()):
        raise ModelConfigError(f"model.attention=varlen needs a CUDA device and bf16/fp16 activations with torch's "
                               f"varlen_attn (got {q.device.type}, {q.dtype}); use auto or segmented")
    if name == "flex" and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ModelConfigError("model.attention=flex cannot train on the CPU (torch has no FlexAttention backward "
                               "there); use auto or segmented")
    return name


@functools.cache
def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@torch.compiler.disable
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, backend: str = "auto") -> torch.Tensor:
    """Document-masked causal attention; ``q`` ``[batch, q_len, heads, head_dim]``, ``k``/``v``
    ``[batch, kv_len, kv_heads, head_dim]`` in position order; returns ``q``'s shape.

    Kept out of ``torch.compile``'s graphs: the runs are host data that differ per batch, and
    each backend calls a fused kernel of its own.
    """
    if q.shape[1] != plan.q_len or k.shape[1] != plan.kv_len or q.shape[0] != plan.batch:
        raise ValueError(f"attention inputs q {tuple(q.shape)} / k {tuple(k.shape)} do not match {plan}")
    name = resolve_backend(backend, plan, q)
    _announce(backend, name, q.device.type, q.dtype)
    return _BACKENDS[name](q, k, v, plan)


@functools.cache
def _announce(setting: str, backend: str, device: str, dtype: torch.dtype) -> None:
    """Say once per process which kernel a setting runs on (``auto`` depends on the batch)."""
    log.info("attention: model.attention=%s runs %s (%s, %s)", setting, backend, device, dtype)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-3, -2)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """The reference: SDPA with the materialised causal same-document mask."""
    device = q.device

    def build() -> torch.Tensor:
        doc_ids = host_to_device(plan.doc_ids, device)
        q_pos = plan.positions(device)
        return document_causal_mask(doc_ids[:, q_pos], doc_ids, q_pos, torch.arange(plan.kv_len, device=device))

    mask = plan._cached(("dense", device), build)
    out = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), attn_mask=mask,
                                         enable_gqa=True)
    return _heads_first(out)


def segmented_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Exact attention per run: only same-document, causal pairs are computed."""
    if q.device.type == "cpu":
        return SegmentedFlashAttention.apply(q, k, v, plan)
    parts = [_heads_first(run_attention(_heads_first(q[rows, qs:qe]), _heads_first(k[rows, ks:ke]),
                                        _heads_first(v[rows, ks:ke])))
             for rows, qs, qe, ks, ke in _run_slices(plan)]
    if plan.same_runs_every_row:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return torch.cat(parts, dim=1).view_as(q)


def _run_slices(plan: AttentionPlan) -> list[tuple[slice, int, int, int, int]]:
    """(rows, q_start, q_end, k_start, k_end) per kernel call, in output order: all rows
    together when every row has the same runs (one causal call for one document per row).
    Made once per plan: every layer's forward and backward walk the same list."""

    def build() -> list[tuple[slice, int, int, int, int]]:
        runs = plan.runs
        if plan.same_runs_every_row:
            return [(slice(None), qs, qe, ks, ke) for _, qs, qe, ks, ke in runs[:len(runs) // plan.batch].tolist()]
        return [(slice(row, row + 1), qs, qe, ks, ke) for row, qs, qe, ks, ke in runs.tolist()]

    return plan._cached(("run slices",), build)


def run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention aligned at the bottom right: ``q`` ``[n, heads, lq, d]`` are the last
    ``lq`` positions of ``k``/``v`` ``[n, kv_heads, lk, d]`` (``lk >= lq``)."""
    prefix = k.shape[2] - q.shape[2]
    if prefix == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                          enable_gqa=True)


class SegmentedFlashAttention(torch.autograd.Function):
    """Every run of a plan through torch's CPU flash kernel, as one autograd node.

    The runs write into one output and one log-sum-exp, which are all that the backward
    keeps besides q, k and v (per-run outputs joined by a concatenation would be kept
    twice). A run that starts after its document does sees a key prefix in full and a
    causal triangle after it: two flash calls merged by their log-sum-exp. The backward
    runs each call's flash backward against the merged output and log-sum-exp - exactly
    how a split softmax differentiates - accumulating key and value gradients in fp32,
    since under context parallelism several runs share keys. No mask is built.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [batch, q_len, heads, dim]
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        qh, kh, vh, oh = (_heads_first(x) for x in (q, k, v, out))
        for rows, qs, qe, ks, ke in _run_slices(plan):
            split = ke - ks - (qe - qs)  # keys every query of the run sees in full
            q_run = qh[rows, :, qs:qe]
            o_run, lse_run = flash(q_run, kh[rows, :, ks + split:ke], vh[rows, :, ks + split:ke], 0.0, True)
            if split:
                o_pre, lse_pre = flash(q_run, kh[rows, :, ks:ks + split], vh[rows, :, ks:ks + split], 0.0, False)
                merged = torch.logaddexp(lse_pre, lse_run)
                o_run = (o_pre.float() * (lse_pre - merged).exp().unsqueeze(-1)
                         + o_run.float() * (lse_run - merged).exp().unsqueeze(-1))
                lse_run = merged
            oh[rows, :, qs:qe] = o_run
            lse[rows, :, qs:qe] = lse_run
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
        dk = torch.zeros(k.shape, dtype=torch.float32)
        dv = torch.zeros(v.shape, dtype=torch.float32)
        qh, kh, vh, oh, gh = (_heads_first(x) for x in (q, k, v, out, grad_out))
        dqh, dkh, dvh = (_heads_first(x) for x in (dq, dk, dv))
        for rows, qs, qe, ks, ke in _run_slices(ctx.plan):
            split = ke - ks - (qe - qs)
            args = (gh[rows, :, qs:qe], qh[rows, :, qs:qe])
            saved = (oh[rows, :, qs:qe], lse[rows, :, qs:qe])
            parts = [(ks + split, ke, True)] + ([(ks, ks + split, False)] if split else [])
            for k0, k1, causal in parts:
                dq_part, dk_part, dv_part = backward(*args, kh[rows, :, k0:k1], vh[rows, :, k0:k1], *saved, 0.0, causal)
                dqh[rows, :, qs:qe] += dq_part
                dkh[rows, :, k0:k1] += dk_part
                dvh[rows, :, k0:k1] += dv_part
        return dq, dk.to(k.dtype), dv.to(v.dtype), None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Flash attention over variable-length runs (CUDA).

    Runs whose queries and keys are both contiguous, one after the other, form a group that
    one call covers: without context parallelism the whole micro-batch is one group; under
    it each row contributes one group per chunk. Flash aligns the causal mask at the bottom
    right when a run has more keys than queries, as the runs need.
    """
    from torch.nn.attention.varlen import varlen_attn

    groups = plan._cached(("varlen", q.device), lambda: _varlen_groups(plan, q.device))
    qf, kf, vf = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    parts = [varlen_attn(qf[q0:q1], kf[k0:k1], vf[k0:k1], cu_q, cu_k, max_q, max_k, window_size=(-1, 0),
                         enable_gqa=True)
             for q0, q1, k0, k1, cu_q, cu_k, max_q, max_k in groups]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out.view_as(q)


def _varlen_groups(plan: AttentionPlan, device: torch.device) -> list[tuple]:
    runs = plan.runs
    q0 = runs[:, ROW] * plan.q_len + runs[:, Q_START]
    q1 = runs[:, ROW] * plan.q_len + runs[:, Q_END]
    k0 = runs[:, ROW] * plan.kv_len + runs[:, K_START]
    k1 = runs[:, ROW] * plan.kv_len + runs[:, K_END]
    new_group = np.ones(len(runs), dtype=bool)
    new_group[1:] = (q0[1:] != q1[:-1]) | (k0[1:] != k1[:-1])
    bounds = list(np.flatnonzero(new_group)) + [len(runs)]
    groups = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cu_q = np.concatenate(([0], np.cumsum(q1[a:b] - q0[a:b]))).astype(np.int32)
        cu_k = np.concatenate(([0], np.cumsum(k1[a:b] - k0[a:b]))).astype(np.int32)
        groups.append((int(q0[a]), int(q1[b - 1]), int(k0[a]), int(k1[b - 1]), host_to_device(cu_q, device),
                       host_to_device(cu_k, device), int((q1[a:b] - q0[a:b]).max()), int((k1[a:b] - k0[a:b]).max())))
    return groups


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """FlexAttention with a block mask: blocks outside every run are skipped entirely."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    block_mask = plan._cached(("flex", q.device), lambda: _flex_block_mask(plan, q.device))
    kernel = _compiled_flex() if q.device.type == "cuda" else flex
    out = kernel(_heads_first(q), _heads_first(k), _heads_first(v), block_mask=block_mask, enable_gqa=True)
    return _heads_first(out)


@functools.cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


def _flex_block_mask(plan: AttentionPlan, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    # Each query's first visible key: its run's k_start; its last: its own position.
    # Runs tile every row's queries in order, so repeating each run's first key per query
    # lays them out [batch, q_len].
    runs = plan.runs
    first_key = np.repeat(runs[:, K_START], runs[:, Q_END] - runs[:, Q_START]).reshape(plan.batch, plan.q_len)
    first = host_to_device(first_key, device)
    last = plan.positions(device)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (kv_idx >= first[b, q_idx]) & (kv_idx <= last[q_idx])

    # Compiled on GPUs: the eager builder would materialise the whole mask to find its blocks.
    build = _compiled_block_mask_builder() if device.type == "cuda" else create_block_mask
    return build(mask_mod, plan.batch, None, plan.q_len, plan.kv_len, device=device)


@functools.cache
def _compiled_block_mask_builder() -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


_BACKENDS = {"dense": dense_attention, "segmented": segmented_attention, "varlen": varlen_attention,
             "flex": flex_attention}


def attention_flops_pairs(plan: AttentionPlan) -> int:
    """Query-key pairs the plan attends (each run: a prefix rectangle plus a causal triangle)."""
    q_len = plan.runs[:, Q_END] - plan.runs[:, Q_START]
    prefix = plan.runs[:, K_END] - plan.runs[:, K_START] - q_len
    return int((q_len * prefix + q_len * (q_len + 1) // 2).sum())


__all__ = ["AttentionPlan", "attend", "document_causal_mask", "document_runs", "resolve_backend",
           "SegmentedFlashAttention", "attention_flops_pairs", "host_to_device"]
