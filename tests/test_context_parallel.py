"""Context parallelism (all-gather K/V) equals one process: loss, logits and every gradient.

Two worlds only (process start-up dominates): 2 ranks run cp=2 and a size-1 cp mesh;
4 ranks run cp=4 and a 2-D ("dp", "cp") = (2, 2) mesh. Each case also runs a negative
control - the same attention with a K/V gather whose remote slices carry no gradient -
which must match the loss but fail the gradient check, proving the check can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import run_world
from torch.distributed.device_mesh import init_device_mesh

# The functional all-gather imports torch._dynamo on its first call (seconds of CPU). The
# harness imports this module in the zygote before forking the ranks, so importing it here
# pays that once per world instead of once per rank. (Lightning imports it anyway in training.)
import torch._dynamo  # noqa: F401,E402  isort: skip
from recipe.model import Attention, ModelArgs, Transformer, document_causal_mask
from recipe.parallel import context
from recipe.parallel.context import (
    ContextParallelAttention,
    ContextParallelError,
    apply_context_parallel,
    gathered_positions,
    load_balance_indices,
    shard_for_context_parallel,
    shard_sequence,
    unshard_sequence,
)

SEQ = 32  # model input length; rows hold SEQ + 1 tokens (inputs and shifted targets)
LOSS_ATOL = 1e-6
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-5
# Packed documents per row: start offsets, deliberately not on chunk boundaries (chunks of
# 8 for cp=2, 4 for cp=4), so masks cross chunks and ranks.
DOC_STARTS = ([0, 5, 11, 19, 30], [0, 3, 14, 22])


def tiny_args() -> ModelArgs:
    return ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                     ffn_dim_multiplier=None, max_seq_len=64)


def packed_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and document ids ``[2, SEQ + 1]`` with several packed documents per row."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, tiny_args().vocab_size, (len(DOC_STARTS), SEQ + 1), generator=gen)
    doc_ids = torch.zeros_like(tokens)
    for row, starts in enumerate(DOC_STARTS):
        for start in starts[1:]:
            doc_ids[row, start:] += 1
    return tokens, doc_ids


# ----------------------------------------------------------------------------- layout (no world)


def test_load_balance_layout_cp2() -> None:
    assert load_balance_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert load_balance_indices(8, 2, 1).tolist() == [2, 3, 4, 5]


def test_load_balance_layout_cp4() -> None:
    layout = [load_balance_indices(16, 4, r).tolist() for r in range(4)]
    assert layout == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    # Same causal work on every rank: sum of (position + 1) keys each local query sees.
    work = {sum(p + 1 for p in ranks) for ranks in layout}
    assert len(work) == 1


@pytest.mark.parametrize("seq_len,cp", [(8, 1), (8, 2), (32, 2), (32, 4), (48, 3)])
def test_ranks_partition_the_sequence(seq_len: int, cp: int) -> None:
    union = torch.cat([load_balance_indices(seq_len, cp, r) for r in range(cp)])
    assert sorted(union.tolist()) == list(range(seq_len))
    assert torch.equal(gathered_positions(seq_len, cp), union)


def test_indivisible_sequence_is_a_one_line_error() -> None:
    with pytest.raises(ContextParallelError, match=r"sequence length 30 is not divisible by 2 x context-parallel "
                                                   r"size = 4; use a seq_len that is a multiple of 4"):
        load_balance_indices(30, 2, 0)
    with pytest.raises(ValueError):  # RecipeError is a ValueError: the CLI reports it in one line
        load_balance_indices(30, 2, 0)


def runs_mask(plan) -> torch.Tensor:
    """The boolean mask ``[batch, 1, q, kv]`` that a plan's runs describe."""
    mask = torch.zeros(plan.batch, 1, plan.q_len, plan.kv_len, dtype=torch.bool)
    for row, qs, qe, ks, _ in plan.runs.tolist():
        for i in range(qs, qe):
            mask[row, 0, i, ks:int(plan.q_positions[i]) + 1] = True
    return mask


def test_local_plan_is_the_global_mask_restricted() -> None:
    """Each rank's plan = the single-process mask's rows of its local queries, keys in position order."""
    tokens, doc_ids = packed_batch(0)
    inp, tgt, docs = tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1]
    full = document_causal_mask(docs)
    for cp in (2, 4):
        for rank in range(cp):
            local = shard_sequence(inp, tgt, docs, cp, rank)
            idx = load_balance_indices(SEQ, cp, rank)
            assert torch.equal(torch.from_numpy(local["positions"]), idx)
            assert torch.equal(local["tokens"], inp[:, idx]) and torch.equal(local["targets"], tgt[:, idx])
            plan = local["attention"]
            assert (plan.q_len, plan.kv_len) == (SEQ // cp, SEQ)
            assert torch.equal(runs_mask(plan), full[:, :, idx])


def test_gathered_keys_return_to_position_order() -> None:
    for cp in (1, 2, 4):
        gathered = gathered_positions(SEQ, cp).view(1, SEQ)
        assert torch.equal(context.to_position_order(gathered, cp), torch.arange(SEQ).view(1, SEQ))


def test_without_cp_nothing_changes() -> None:
    tokens, doc_ids = packed_batch(0)
    local = shard_for_context_parallel(tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1], None)
    assert torch.equal(local["tokens"], tokens[:, :-1])
    assert torch.equal(runs_mask(local["attention"]), document_causal_mask(doc_ids[:, :-1]))
    # One document per row keeps SDPA's causal fast path.
    assert shard_for_context_parallel(tokens[:, :-1], tokens[:, 1:], None, None)["attention"].whole_rows
    model = Transformer(tiny_args())
    assert apply_context_parallel(model, None) is model
    assert all(type(m) is Attention for m in model.modules() if isinstance(m, Attention))


def test_mismatched_shapes_are_rejected() -> None:
    tokens, doc_ids = packed_batch(0)
    with pytest.raises(ContextParallelError, match="must all be"):
        shard_sequence(tokens[:, :-1], tokens, doc_ids[:, :-1], 2, 0)


# ----------------------------------------------------------------------------- parity (worlds)


def _sum_over(group: dist.ProcessGroup, tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor, group=group)
    return tensor


def _max_diffs(ref_loss: torch.Tensor, ref_grads: dict[str, torch.Tensor], loss: torch.Tensor,
               grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max absolute loss/grad differences and the worst grad excess over atol + rtol * |ref|."""
    grad_abs = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
    grad_excess = max(((grads[n] - g).abs() - GRAD_ATOL - GRAD_RTOL * g.abs()).max().item()
                      for n, g in ref_grads.items())
    return {"loss": (loss - ref_loss).abs().item(), "grad": grad_abs, "grad_excess": grad_excess}


def _cp_step(model: Transformer, cp, group: dist.ProcessGroup, tokens: torch.Tensor, doc_ids: torch.Tensor,
             count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One micro-batch as the training step runs it; loss and grads summed over the cp group."""
    local = shard_for_context_parallel(tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1], cp)
    logits = model(local["tokens"], attention=local["attention"])
    loss = F.cross_entropy(logits.flatten(0, 1), local["targets"].flatten(), reduction="sum") / count
    loss.backward()
    grads = {n: _sum_over(group, p.grad) for n, p in model.named_parameters()}
    return _sum_over(group, loss.detach()), grads, unshard_sequence(logits.detach(), cp)


def _gather_without_backward(group: dist.ProcessGroup):
    """The bug the negative control plants: remote K/V slices arrive as constants."""
    def gather(x: torch.Tensor, _group_name: str) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.detach().contiguous(), group=group)
        parts[dist.get_rank(group)] = x  # only the local slice keeps its autograd path
        return torch.cat(parts, dim=1)
    return gather


def _parity_case(cp, seed: int) -> dict[str, object]:
    """Single-process reference vs. context parallel (and the negative control) on one batch."""
    group = context.resolve_cp_group(cp)
    torch.manual_seed(0)
    reference = Transformer(tiny_args())
    reference.init_weights()
    tokens, doc_ids = packed_batch(seed)
    count = tokens[:, 1:].numel()

    ref_logits = reference(tokens[:, :-1], doc_ids=doc_ids[:, :-1])
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum") / count
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}

    model = apply_context_parallel(_fresh_copy(reference), cp)
    n_cp = sum(isinstance(m, ContextParallelAttention) for m in model.modules())
    loss, grads, logits = _cp_step(model, cp, group, tokens, doc_ids, count)
    result: dict[str, object] = _max_diffs(ref_loss.detach(), ref_grads, loss, grads)
    result["logits"] = (logits - ref_logits.detach()).abs().max().item()
    result["cp_size"] = dist.get_world_size(group)
    result["cp_modules"] = n_cp

    # Negative control: same model, gather without a backward.
    original = context.all_gather_sequence
    context.all_gather_sequence = _gather_without_backward(group)
    try:
        bad = apply_context_parallel(_fresh_copy(reference), cp)
        bad_loss, bad_grads, _ = _cp_step(bad, cp, group, tokens, doc_ids, count)
    finally:
        context.all_gather_sequence = original
    control = _max_diffs(ref_loss.detach(), ref_grads, bad_loss, bad_grads)
    result.update({f"control_{k}": v for k, v in control.items()})

    # Without the shard's plan, local queries cannot be aligned with the gathered keys.
    try:
        model(tokens[:, :SEQ // 2])
        result["maskless"] = "ran"
    except ValueError as err:
        result["maskless"] = str(err)
    return result


def _fresh_copy(model: Transformer) -> Transformer:
    copied = copy.deepcopy(model)
    copied.zero_grad(set_to_none=True)
    return copied


def _world_of_two() -> list[dict[str, object]]:
    cases = [_parity_case(dist.group.WORLD, seed=1)]
    # A size-1 cp dimension changes nothing: same logits, plain Attention modules.
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "cp"))
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    model.init_weights()
    tokens, doc_ids = packed_batch(2)
    ref = model(tokens[:, :-1], doc_ids=doc_ids[:, :-1])
    same = apply_context_parallel(model, mesh)
    local = shard_for_context_parallel(tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1], mesh)
    out = same(local["tokens"], attention=local["attention"])
    cases.append({"cp1_logits": (out - ref).abs().max().item(),
                  "cp1_plain": all(type(m) is Attention for m in same.modules() if isinstance(m, Attention))})
    return cases


def _world_of_four() -> list[dict[str, object]]:
    cases = [_parity_case(dist.group.WORLD, seed=3)]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    # Each replica trains on its own batch: the cp groups must not mix.
    cases.append(_parity_case(mesh, seed=10 + mesh.get_local_rank("dp")))
    return cases


def _check_parity(case: dict[str, object], cp_size: int) -> None:
    assert case["cp_size"] == cp_size and case["cp_modules"] == tiny_args().n_layers
    assert case["loss"] < LOSS_ATOL, case
    assert case["grad_excess"] <= 0, case
    assert case["logits"] < 1e-5, case
    # The control still matches the loss but must fail the gradient check.
    assert case["control_loss"] < LOSS_ATOL, case
    assert case["control_grad_excess"] > 0 and case["control_grad"] > 10 * GRAD_ATOL, case
    assert "shard_for_context_parallel" in case["maskless"], case


def test_context_parallel_matches_one_process_two_ranks() -> None:
    results = run_world(_world_of_two, 2)
    for rank_cases in results:
        cp2, cp1 = rank_cases
        _check_parity(cp2, cp_size=2)
        assert cp1["cp1_plain"] and cp1["cp1_logits"] == 0.0, cp1
    print("cp=2", {k: v for k, v in results[0][0].items() if k != "maskless"})


def test_context_parallel_matches_one_process_four_ranks() -> None:
    results = run_world(_world_of_four, 4)
    for rank_cases in results:
        cp4, dp2_cp2 = rank_cases
        _check_parity(cp4, cp_size=4)
        _check_parity(dp2_cp2, cp_size=2)
    print("cp=4", {k: v for k, v in results[0][0].items() if k != "maskless"})
    print("dp2xcp2", {k: v for k, v in results[0][1].items() if k != "maskless"})
