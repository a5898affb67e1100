"""Pipeline parallelism: layouts, stage modules, and parity with one process (gloo, CPU).

Two worlds are started (process start-up dominates): 2 ranks run every pp=2 case, 4 ranks
run pp=2 x dp=2 on a 2-D ("dp", "pp") mesh. Each rank computes the single-process reference
(loss and every gradient) itself, then runs the pipelined step and compares by parameter
name; the worlds return the measured differences and the test asserts on them.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_world
from recipe.model import ModelArgs, Transformer, build_meta_model
from recipe.parallel.pipeline import (
    PipelineError,
    PipelineRunner,
    broadcast_loss,
    build_stage_modules,
    check_schedule,
    next_token_loss,
    split_layers,
)

TOL = 1e-6
SEQ = 16


def tiny_args(n_layers: int = 8) -> ModelArgs:
    return ModelArgs(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                     ffn_dim_multiplier=None, max_seq_len=64)


def tiny_model(n_layers: int = 8) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_args(n_layers))
    model.init_weights()
    return model


def packed_batch(rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows x (SEQ + 1)`` tokens with several packed documents per row."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 97, (rows, SEQ + 1), generator=g)
    doc_ids = torch.zeros(rows, SEQ + 1, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(torch.randperm(SEQ - 1, generator=g)[:2 + r % 2].add(1).tolist())
        for c in cuts:
            doc_ids[r, c:] += 1
        doc_ids[r] += 10 * r
    return tokens, doc_ids


def reference(model: Transformer, tokens: torch.Tensor, doc_ids: torch.Tensor) -> tuple[float, dict]:
    """Single-process loss (sum CE / all targets) and gradients by name."""
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1], doc_ids[:, :-1] if doc_ids is not None else None)
    loss = next_token_loss(logits, tokens[:, 1:], tokens[:, 1:].numel())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def grad_diff(runner: PipelineRunner, ref_grads: dict, dp_group=None) -> tuple[float, int]:
    """Max |grad - reference| over this rank's parameters (after summing over DP)."""
    worst, count = 0.0, 0
    for name, p in runner.named_parameters():
        grad = p.grad.clone()
        if dp_group is not None:
            dist.all_reduce(grad, group=dp_group)
        worst = max(worst, (grad - ref_grads[name]).abs().max().item())
        count += 1
    return worst, count


def run_case(model, tokens, doc_ids, ref_loss, ref_grads, pp_group, schedule, stages_per_rank, first_last_fewer,
             micro_counts, normalizer=None, dp_group=None, three_d=False) -> dict:
    pp_rank, pp_size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
    stages = build_stage_modules(model, pp_rank, pp_size, stages_per_rank, first_last_fewer)
    runner = PipelineRunner(stages, pp_group, schedule)
    normalizer = normalizer or tokens[:, 1:].numel()
    out = {"loss": [], "grad": [], "params": 0, "eval": None}
    for n in micro_counts:
        for p in runner.parameters():
            p.grad = None
        if three_d:
            t, d = tokens.unflatten(0, (n, -1)), doc_ids.unflatten(0, (n, -1)) if doc_ids is not None else None
            loss = runner.step(t, d, normalizer)
        else:
            loss = runner.step(tokens, doc_ids, normalizer, n_microbatches=n)
        assert (loss is not None) == runner.has_last_stage
        loss = broadcast_loss(loss, pp_group, runner.last_stage_rank)
        if dp_group is not None:
            dist.all_reduce(loss, group=dp_group)
        diff, out["params"] = grad_diff(runner, ref_grads, dp_group)
        out["loss"].append(abs(loss.item() - ref_loss))
        out["grad"].append(diff)
    out["cached"] = len(runner._train)
    if dp_group is None:
        ev = broadcast_loss(runner.evaluate(tokens, doc_ids, normalizer, n_microbatches=micro_counts[0]),
                            pp_group, runner.last_stage_rank)
        out["eval"] = abs(ev.item() - ref_loss)
    return out


PP2_CASES = [
    # (schedule, stages_per_rank, first_last_fewer, micro-batch counts, 3-D batch)
    ("GPipe", 1, False, [2, 4, 2], False),
    ("GPipe", 1, True, [4], True),
    ("1F1B", 1, False, [2, 4, 2], False),
    ("1F1B", 1, True, [4, 2], True),
    ("Interleaved1F1B", 2, False, [2, 4, 2], False),
    ("Interleaved1F1B", 2, True, [4, 2], False),
    ("Interleaved1F1B", 1, False, [2], False),
    ("LoopedBFS", 2, True, [2, 4], False),
    ("InterleavedZeroBubble", 2, False, [2, 4], False),
]


def _pp2_world() -> dict:
    model = tiny_model(8)
    tokens, doc_ids = packed_batch(4)
    ref_loss, ref_grads = reference(model, tokens, doc_ids)
    group = dist.group.WORLD
    results = {}
    for schedule, spr, flf, micro, three_d in PP2_CASES:
        start = time.perf_counter()
        results[(schedule, spr, flf)] = run_case(model, tokens, doc_ids, ref_loss, ref_grads, group, schedule, spr,
                                                 flf, micro, three_d=three_d)
        results[(schedule, spr, flf)]["seconds"] = time.perf_counter() - start
    # No document ids: one causal document per row, as the single-process model.
    ref_loss, ref_grads = reference(model, tokens, None)
    results[("1F1B", 1, "no doc_ids")] = run_case(model, tokens, None, ref_loss, ref_grads, group, "1F1B", 1, False,
                                                   [2])
    # Errors raised before any communication, identically on every rank.
    runner = PipelineRunner(build_stage_modules(model, dist.get_rank(), 2), group, "1F1B")
    errors = []
    for rows, n in [(4, 1), (3, 2)]:
        try:
            runner.step(tokens[:rows], doc_ids[:rows], 1.0, n_microbatches=n)
        except PipelineError as err:
            errors.append(str(err))
    results["errors"] = errors
    # The full model is untouched by the split.
    assert all(p.grad is None for p in model.parameters())
    return results


def _pp2_dp2_world() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    model = tiny_model(8)
    tokens, doc_ids = packed_batch(8)
    ref_loss, ref_grads = reference(model, tokens, doc_ids)
    dp_rank = mesh["dp"].get_local_rank()
    local = slice(4 * dp_rank, 4 * dp_rank + 4)
    results = {}
    for schedule, spr, micro in [("Interleaved1F1B", 2, [2, 4]), ("1F1B", 1, [2])]:
        results[schedule] = run_case(model, tokens[local], doc_ids[local], ref_loss, ref_grads,
                                     mesh["pp"].get_group(), schedule, spr, True, micro,
                                     normalizer=tokens[:, 1:].numel(), dp_group=mesh["dp"].get_group())
    return results


# ----------------------------------------------------------------------------- unit


def test_split_layers_plain():
    assert split_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_layers(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    assert split_layers(3, 1) == [[0, 1, 2]]


def test_split_layers_first_last_fewer():
    assert split_layers(8, 4, True) == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert split_layers(6, 4, True) == [[0], [1, 2], [3, 4], [5]]
    assert split_layers(4, 2, True) == [[0, 1], [2, 3]]
    assert split_layers(3, 2, True) == [[0, 1], [2]]
    assert split_layers(5, 1, True) == [[0, 1, 2, 3, 4]]
    # The paper's 405B layout: 126 layers on 16 stages -> 7, 8 x 14, 7.
    assert [len(s) for s in split_layers(126, 16, True)] == [7] + [8] * 14 + [7]
    for n_layers, n_stages in [(9, 3), (17, 5), (30, 8)]:
        layout = split_layers(n_layers, n_stages, True)
        assert sum(layout, []) == list(range(n_layers))
        sizes = [len(s) for s in layout]
        assert max(sizes[1:-1]) - min(sizes[1:-1]) <= 1 and min(sizes) >= 1


def test_split_layers_errors():
    with pytest.raises(PipelineError, match=r"cannot split 3 layers into 4 pipeline stages.*at most 3"):
        split_layers(3, 4)
    with pytest.raises(PipelineError, match=r"5 layers into 4 .*first_last_fewer \(needs at least 6"):
        split_layers(5, 4, True)
    with pytest.raises(PipelineError):
        split_layers(0, 1)


def test_check_schedule():
    assert check_schedule("interleaved1f1b", 2) == "Interleaved1F1B"
    with pytest.raises(PipelineError, match="unknown pipeline schedule 'ZBVZeroBubble'"):
        check_schedule("ZBVZeroBubble", 2)
    with pytest.raises(PipelineError, match="1F1B runs one stage per rank but stages_per_rank=2"):
        check_schedule("1F1B", 2)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_stage_modules_keep_names(device):
    args = tiny_args(8)
    model = build_meta_model(args) if device == "meta" else tiny_model(8)
    full = dict(model.named_parameters())
    seen: dict[str, int] = {}
    for rank in range(2):
        stages = build_stage_modules(model, rank, 2, stages_per_rank=2, first_last_fewer=True)
        assert [s for s, _ in stages] == [rank, rank + 2]
        for stage_index, module in stages:
            names = [n for n, _ in module.named_parameters()]
            for name in names:
                assert name not in seen, f"{name} owned twice"
                seen[name] = stage_index
                assert module.get_parameter(name).shape == full[name].shape
            assert (module.tok_embeddings is not None) == (stage_index == 0)
            assert (module.output is not None) == (module.norm is not None) == (stage_index == 3)
    assert set(seen) == set(full)
    assert seen["layers.0.attention.wq.weight"] == 0 and seen["layers.3.feed_forward.w2.weight"] == 1
    assert seen["layers.7.ffn_norm.weight"] == 3 and seen["output.weight"] == 3
    assert len(list(model.parameters())) == len(full)  # the full model is unchanged


def test_meta_stage_materialises():
    stage = dict(build_stage_modules(build_meta_model(tiny_args(4)), 1, 2))[1]
    stage.to_empty(device="cpu")
    stage.init_weights(buffer_device=torch.device("cpu"))
    h = torch.randn(2, SEQ, 32)
    logits = stage(h, torch.zeros(2, SEQ, dtype=torch.long))
    assert logits.shape == (2, SEQ, 97) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- parity


def _report(results: dict) -> float:
    worst = 0.0
    for case, r in results.items():
        print(f"{case}: loss diff {max(r['loss']):.2e}, grad diff {max(r['grad']):.2e}, "
              f"{r['params']} params, eval diff {r['eval']}, {r.get('seconds', 0):.2f}s")
        worst = max(worst, max(r["loss"]), max(r["grad"]))
    return worst


def test_pp2_schedules_match_single_process():
    results = run_world(_pp2_world, 2, timeout=300)
    for rank_results in results:
        errors = rank_results.pop("errors")
        assert "cannot run 1 micro-batches on 2 stages" in errors[0]
        assert "3 rows do not split into 2 equal micro-batches" in errors[1]
        _report(rank_results)
        for (schedule, spr, flf), r in rank_results.items():
            assert max(r["loss"]) < TOL, (schedule, spr, flf, r["loss"])
            assert max(r["grad"]) < TOL, (schedule, spr, flf, r["grad"])
            assert r["params"] > 0
            assert r["eval"] < TOL
    # Every micro-batch count used got its own cached schedule and n=2 was reused.
    assert results[0][("GPipe", 1, False)]["cached"] == 2
    # Between them the two ranks own every parameter (full model: 8 layers x 9 + 3).
    assert results[0][("1F1B", 1, True)]["params"] + results[1][("1F1B", 1, True)]["params"] == 8 * 9 + 3


def test_pp2_dp2_mesh_matches_single_process():
    results = run_world(_pp2_dp2_world, 4, timeout=300)
    for rank_results in results:
        _report(rank_results)
        for schedule, r in rank_results.items():
            assert max(r["loss"]) < TOL, (schedule, r["loss"])
            assert max(r["grad"]) < TOL, (schedule, r["grad"])
