"""Context parallelism: the Llama 3 paper's all-gather K/V variant.

Each of the ``cp`` ranks of a context-parallel group holds a slice of every sequence of
the micro-batch. Attention all-gathers K and V over the group (small under GQA: only the
``n_kv_heads`` heads travel) and each rank attends with its local queries against the
whole sequence. Chosen over ring attention because, with the whole sequence's keys at
hand, the paper's same-document mask for packed sequences stays exact.

Load balancing: under a causal mask the late tokens do most of the work, so the sequence
is cut into ``2 * cp`` chunks and rank ``i`` holds chunks ``i`` and ``2 * cp - 1 - i``
(one early, one late): every rank gets the same number of query-key pairs.

Training-step contract (per micro-batch, on every rank of the cp group)::

    model = apply_context_parallel(model, cp_mesh)          # once, before fully_shard
    local = shard_for_context_parallel(tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1], cp_mesh)
    logits = model(local["tokens"], attention=local["attention"])
    loss = F.cross_entropy(logits.flatten(0, 1), local["targets"].flatten(), reduction="sum")
    (loss / global_token_count).backward()

* ``tokens``/``targets``/``doc_ids`` are the *full* rows ``[batch, seq]``, identical on every
  rank of the cp group (the data loader shards over data-parallel ranks only), and ``seq``
  must be divisible by ``2 * cp``. ``doc_ids`` stay on the host: the attention plan is built
  from them there.
* ``global_token_count`` is the number of targets of the whole global batch (all
  micro-batches, all data-parallel ranks), not of the local shard: each cp rank sums the
  cross-entropy of its own tokens, so the cp ranks' losses add up to the batch loss.
* Parameter gradients on one cp rank are partial (its tokens only). Summing them over the
  cp group - which FSDP's reduce-scatter over ``dp_shard x cp`` does, with a gradient
  divide factor of 1 - gives exactly the single-process gradient. The K/V all-gather is
  differentiable for that reason: its backward reduce-scatters the K/V gradients back to
  the ranks whose tokens produced them. A non-differentiable gather still gives the right
  loss but wrong gradients.
* With pipeline parallelism, pass the plan to every stage (the schedule splits it by rows);
  later stages receive local hidden states ``[batch, seq / cp, dim]``.
* With cp size 1 (or no group) nothing changes: the rows come back whole and the plan is
  the single-process one; ``apply_context_parallel`` leaves the model alone.

No mask is built: the gathered K/V are put back in position order and the attention plan
describes each local query's keys as a contiguous range (its document's start to itself),
so every backend computes only the pairs that count, and the head-tail chunks balance the
work of causal attention across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from recipe.errors import RecipeError
from recipe.parallel import collectives
from recipe.attention import AttentionPlan
from recipe.model import Attention

CpGroup = DeviceMesh | dist.ProcessGroup | None
"""A 1-D cp mesh, a mesh with a ``"cp"`` dimension, a process group, or None (no cp)."""


class ContextParallelError(RecipeError):
    """A sequence length or batch that cannot be split across the context-parallel ranks."""


# ----------------------------------------------------------------------------- layout


def load_balance_indices(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions held by ``cp_rank``: chunks ``cp_rank`` and ``2*cp - 1 - cp_rank``.

    The sequence is cut into ``2 * cp_size`` equal chunks; pairing an early chunk with a
    late one gives every rank the same share of the causal mask's work.
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ContextParallelError(f"context-parallel rank {cp_rank} is outside a group of size {cp_size}")
    n_chunks = 2 * cp_size
    if seq_len % n_chunks:
        raise ContextParallelError(
            f"sequence length {seq_len} is not divisible by 2 x context-parallel size = {n_chunks}; "
            f"use a seq_len that is a multiple of {n_chunks} or a smaller cp size"
        )
    chunk = seq_len // n_chunks
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    last_chunk = n_chunks - 1 - cp_rank
    second = torch.arange(last_chunk * chunk, (last_chunk + 1) * chunk)
    return torch.cat((first, second))


def gathered_positions(seq_len: int, cp_size: int) -> torch.Tensor:
    """Global position of each slot of an all-gathered sequence (rank-major order).

    The all-gather concatenates the ranks' local slices in group-rank order, so the
    gathered K/V is a permutation of the sequence; this is that permutation.
    """
    return torch.cat([load_balance_indices(seq_len, cp_size, r) for r in range(cp_size)])


def resolve_cp_group(cp: CpGroup) -> dist.ProcessGroup | None:
    """The process group of the cp dimension, or None when there is no context parallelism."""
    if cp is None:
        return None
    if isinstance(cp, DeviceMesh):
        # A multi-dimensional mesh (e.g. the strategy's 5-axis mesh) is sliced by name.
        mesh = cp if cp.ndim == 1 else cp["cp"]
        return mesh.get_group()
    return cp


def cp_size_and_rank(cp: CpGroup) -> tuple[int, int]:
    """(size, this rank's index) of the cp group; (1, 0) without one."""
    group = resolve_cp_group(cp)
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# ----------------------------------------------------------------------------- data


def shard_for_context_parallel(tokens: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None,
                               cp: CpGroup) -> dict[str, Any]:
    """This rank's slice of a micro-batch, with its attention plan.

    Inputs are the full rows ``[batch, seq]`` (the same on every cp rank); ``doc_ids=None``
    means one document per row. See ``shard_sequence`` for what comes back.
    """
    size, rank = cp_size_and_rank(cp)
    return shard_sequence(tokens, targets, doc_ids, size, rank)


def shard_sequence(tokens: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None,
                   cp_size: int, cp_rank: int) -> dict[str, Any]:
    """``shard_for_context_parallel`` for an explicit (size, rank). Returns:

    * ``tokens``, ``targets``: ``[batch, seq / cp]`` local slices (on their device);
    * ``positions``: host ``[seq / cp]`` global positions of the local tokens;
    * ``attention``: the ``AttentionPlan`` of the local queries against the whole rows.

    No communication, and no device work beyond slicing: the plan comes from host ids.
    """
    if targets.shape != tokens.shape or (doc_ids is not None and doc_ids.shape != tokens.shape):
        raise ContextParallelError(
            f"tokens {tuple(tokens.shape)}, targets {tuple(targets.shape)} and doc_ids "
            f"{None if doc_ids is None else tuple(doc_ids.shape)} must all be [batch, seq]"
        )
    seq_len = tokens.shape[1]
    if doc_ids is None:
        doc_ids = torch.zeros(tokens.shape, dtype=torch.long)
    elif doc_ids.device.type != "cpu":
        doc_ids = doc_ids.cpu()  # a caller outside the data module: one wait for the device
    if cp_size == 1:
        plan = AttentionPlan(doc_ids)
        return {"tokens": tokens, "targets": targets, "positions": plan.q_positions, "attention": plan}
    local = load_balance_indices(seq_len, cp_size, cp_rank)
    chunk = seq_len // (2 * cp_size)
    first, last = int(local[0]), int(local[chunk])

    def take(x: torch.Tensor) -> torch.Tensor:  # two slices: no index tensor on the device
        return torch.cat((x[:, first:first + chunk], x[:, last:last + chunk]), dim=1)

    plan = AttentionPlan(doc_ids, local.numpy())
    return {"tokens": take(tokens), "targets": take(targets), "positions": plan.q_positions, "attention": plan}


def unshard_sequence(local: torch.Tensor, cp: CpGroup, seq_dim: int = 1) -> torch.Tensor:
    """Reassemble a sequence-sharded tensor (e.g. logits) into global order on every rank.

    For evaluation and tests; not differentiable.
    """
    size, _ = cp_size_and_rank(cp)
    if size == 1:
        return local
    gathered = torch.cat(collectives.all_gather(local, resolve_cp_group(cp)), dim=seq_dim)
    return to_position_order(gathered.movedim(seq_dim, 1), size).movedim(1, seq_dim)


# ----------------------------------------------------------------------------- attention


def all_gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | str) -> torch.Tensor:
    """Differentiable all-gather of ``[batch, seq, heads, head_dim]`` along seq, rank order.

    The functional collective's backward is a reduce-scatter (sum): each rank gets back the
    gradient that every rank's queries sent to its keys and values. (Its first call
    imports torch._dynamo, a few seconds once per process.)
    """
    return collectives.all_gather_autograd(x, 1, group)


def to_position_order(gathered: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Reorder an all-gathered ``[batch, seq, ...]`` from rank order to position order.

    Rank ``r`` contributed chunks ``r`` and ``2 * cp - 1 - r``; one copy puts the ``2 * cp``
    chunks back in order, so a document's keys are one contiguous range for the attention.
    """
    chunks = gathered.chunk(2 * cp_size, dim=1)  # rank r's two chunks are 2r and 2r + 1
    order = [chunks[2 * j] if j < cp_size else chunks[2 * (2 * cp_size - 1 - j) + 1] for j in range(2 * cp_size)]
    return torch.cat(order, dim=1)


class ContextParallelAttention(Attention):
    """``Attention`` whose ``attend`` all-gathers K/V over the cp group first.

    Only ``attend`` changes, so parameter names, checkpoints and the tensor-parallel plan
    are those of ``Attention``. Built by ``apply_context_parallel`` (class swap in place).
    """

    cp_group_name: str
    cp_size: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        if plan.kv_len != q.shape[1] * self.cp_size:
            raise ContextParallelError(
                f"context-parallel attention got a plan for {plan.kv_len} keys but gathers {q.shape[1] * self.cp_size}: "
                "pass the attention plan of shard_for_context_parallel"
            )
        # Gather only the n_kv_heads K/V heads (GQA): cp x smaller than the query heads.
        k = to_position_order(all_gather_sequence(k, self.cp_group_name), self.cp_size)
        v = to_position_order(all_gather_sequence(v, self.cp_group_name), self.cp_size)
        return super().attend(q, k, v, plan)

    def extra_repr(self) -> str:
        return f"cp_size={self.cp_size}"


def apply_context_parallel(model: nn.Module, cp: CpGroup) -> nn.Module:
    """Make every ``Attention`` of ``model`` context parallel over ``cp``; returns ``model``.

    Apply after tensor parallelism and before ``fully_shard`` (FSDP swaps classes too).
    With cp size 1 the model is returned untouched.
    """
    group = resolve_cp_group(cp)
    size, _ = cp_size_and_rank(group)
    if size == 1:
        return model
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        if type(module) not in (Attention, ContextParallelAttention):
            raise TypeError(f"apply_context_parallel before fully_shard: found {type(module).__name__}")
        module.__class__ = ContextParallelAttention
        # The group's name, not the group: the module stays deep-copyable and picklable.
        module.cp_group_name = group.group_name
        module.cp_size = size
    return model
