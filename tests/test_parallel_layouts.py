"""Every parallel layout trains exactly as one process does (fp32, CPU, gloo).

One reference run in this process, then one 4-rank world that trains the same model from
the same weights on the same data under each layout with the real Trainer, strategy and
LightningModule. Per-step losses, gradient norms and the final parameters must match.

The corpus is many short documents (``short_documents``), so every trained row packs
several of them: the document mask is part of what each layout must reproduce, with
boundaries inside and across context-parallel chunks and documents running across rows.
"""

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch

from callbacks.batch_ramp import BatchSizeRamp, RampStage
from dist_harness import run_world
from recipe.data.build import build_shards
from recipe.data.datamodule import TokenDataModule
from recipe.model import ModelArgs
from recipe.module import LlamaLightningModule
from recipe.config import OptimizerConfig
from recipe.config import LRSchedule
from short_documents import packing_stats, row_documents, short_documents_corpus

ARCH = dict(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=32, ffn_dim_multiplier=None, max_seq_len=64)
DATA = dict(seq_len=16, global_batch_size=8, micro_batch_size=2, val_batches=0, build_demo=False)
STEPS = 3
CP_CHUNKS = 4  # cp=2 cuts each row into 2 * cp load-balancing chunks
# 128-token steps of 16-token sequences, then (from 256 tokens on) 256-token steps of 32.
RAMP = [RampStage(0, 128, 16), RampStage(256, 256, 32)]

# World size -> layouts trained inside one world of that size (process start-up is the
# expensive part, so each world size starts once).
LAYOUTS = {
    2: {
        # Lightning's own DDP (what `--trainer.devices 2` picks): gradients summed, not averaged twice.
        "lightning_ddp": dict(strategy="ddp"),
        "dp2": dict(dp_replicate=2, dp_shard=1),
        "fsdp2": dict(dp_shard=2),
        "fsdp2_activation_checkpointing": dict(dp_shard=2, activation_checkpointing="full"),
        # torch.compile per block (inductor's C++ backend), with AC inside the compiled blocks.
        "fsdp2_compile_selective_ac": dict(dp_shard=2, compile=True, activation_checkpointing="selective",
                                           activation_checkpointing_every_n=2),
        "fsdp2_reduce_every_micro_batch": dict(dp_shard=2, reduce_every_micro_batch=True),
        "tp2": dict(tp=2, dp_shard=1),
        "cp2": dict(cp=2, dp_shard=1),
        "cp2_compile": dict(cp=2, dp_shard=1, compile=True),
        "pp2_gpipe": dict(pp=2, dp_shard=1, pp_schedule="GPipe"),
        "pp2_1f1b": dict(pp=2, dp_shard=1, pp_schedule="1F1B"),
        "pp2_interleaved": dict(pp=2, dp_shard=1, pp_schedule="Interleaved1F1B", pp_stages_per_rank=2),
        "pp2_zero_bubble": dict(pp=2, dp_shard=1, pp_schedule="InterleavedZeroBubble", pp_stages_per_rank=2),
        # The batch-size ramp changes batch tokens, sequence length and micro-batch count mid-run.
        "fsdp2_ramp": dict(dp_shard=2, ramp=True),
        "pp2_1f1b_ramp": dict(pp=2, dp_shard=1, pp_schedule="1F1B", ramp=True),
    },
    4: {
        "hsdp2x2": dict(dp_replicate=2, dp_shard=2),
        "fsdp2_tp2": dict(tp=2, dp_shard=2),
        "tp4_no_loss_parallel": dict(tp=4, dp_shard=1, loss_parallel=False),
        "pp2_fsdp2": dict(pp=2, dp_shard=2),
        "cp2_tp2": dict(cp=2, tp=2, dp_shard=1),
    },
    8: {"pp2_cp2_tp2": dict(pp=2, cp=2, tp=2, dp_shard=1)},
    16: {"4d_pp2_dp2_cp2_tp2": dict(pp=2, dp_shard=2, cp=2, tp=2)},
}


class Recorder(L.Callback):
    """Per-step loss and gradient norm, the full gradients of the first step, and the
    document ids of every row this rank trained on."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.first_grads: dict[str, torch.Tensor] = {}
        self.rows: list[list[int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.first_grads = full_tensors({n: p.grad for n, p in pl_module.model.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))
        self.rows.extend(row_documents(batch["doc_ids"]))


def make_module() -> LlamaLightningModule:
    # Weights start equal under every layout through the module's replicable init.
    return LlamaLightningModule(
        arch=ModelArgs(**ARCH), optimizer=OptimizerConfig(lr=5e-4),
        lr_schedule=LRSchedule(warmup_steps=1, decay_steps=10, min_lr=1e-4), grad_clip=0.5,
    )


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for name, t in tensors.items()}


def summary(module: LlamaLightningModule, recorder: "Recorder") -> dict:
    return {"losses": recorder.losses, "grad_norms": recorder.grad_norms, "grads": recorder.first_grads,
            "params": full_tensors(dict(module.model.named_parameters())), "rows": recorder.rows}


def fit(module, data_dir: Path, strategy="auto", devices: int = 1, max_steps: int = STEPS,
        ckpt_dir: Path | None = None, ckpt_path: str | None = None, ramp: bool = False) -> Recorder:
    recorder = Recorder()
    callbacks: list = [recorder]
    if ramp:
        callbacks.append(BatchSizeRamp(RAMP))
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=max_steps, save_last=True))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
                        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=TokenDataModule(data_dir=str(data_dir), **DATA), ckpt_path=ckpt_path)
    return recorder


def _fit_layouts(data_dir: str, layouts: dict, resume: dict | None = None) -> dict:
    """Train each layout from scratch; with ``resume``, also save under one layout and resume under another."""
    from recipe.parallel.strategy import Parallel4DStrategy

    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for name, layout in layouts.items():
        layout = dict(layout)
        ramp = layout.pop("ramp", False)
        strategy = layout.pop("strategy", None) or Parallel4DStrategy(**layout)
        module = make_module()
        recorder = fit(module, Path(data_dir), strategy=strategy, devices=world, ramp=ramp)
        results[name] = summary(module, recorder)
    if resume is not None:
        ckpt_dir = Path(resume["ckpt_dir"])
        fit(make_module(), Path(data_dir), strategy=Parallel4DStrategy(**resume["save"]), devices=world,
            max_steps=STEPS - 1, ckpt_dir=ckpt_dir)
        module = make_module()
        recorder = fit(module, Path(data_dir), strategy=Parallel4DStrategy(**resume["load"]), devices=world,
                       ckpt_path=str(ckpt_dir / "last.ckpt"))
        results["resumed"] = summary(module, recorder)
    return results


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    corpus = short_documents_corpus(root / "corpus" / "documents.jsonl")
    data_dir = root / "shards"
    build_shards(corpus, data_dir, val_fraction=0.25)
    reference = make_module()
    recorder = fit(reference, data_dir)
    initial = make_module()
    initial.configure_model()
    ref = summary(reference, recorder)
    # The comparison is only meaningful if training moved the weights.
    moved = max((ref["params"][n] - p).abs().max().item() for n, p in initial.model.named_parameters())
    assert len(ref["losses"]) == STEPS and moved > 1e-4
    ramped = make_module()
    ref["ramp"] = summary(ramped, fit(ramped, data_dir, ramp=True))
    # Every trained row (16-token rows, and the ramp's 32-token ones) packs several
    # documents, cut inside and across the chunks context parallelism splits it into.
    for run in (ref, ref["ramp"]):
        stats = packing_stats(run["rows"], CP_CHUNKS)
        assert stats["rows"] == STEPS * DATA["global_batch_size"], stats
        assert stats["min_documents"] >= 2, stats
        assert stats["boundaries_inside_chunks"] >= stats["rows"], stats
        assert stats["documents_across_chunks"] >= stats["rows"] and stats["documents_across_rows"] > 0, stats
    return data_dir, ref


def merge_ranks(per_rank: list[dict]) -> dict:
    """Rank 0's losses; parameters and gradients from every rank (pipeline ranks own different ones)."""
    merged = {}
    for name, got in per_rank[0].items():
        merged[name] = {**got, "grads": {}, "params": {}}
        for rank in per_rank:
            merged[name]["grads"].update(rank[name]["grads"])
            merged[name]["params"].update(rank[name]["params"])
    return merged


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_every_layout_matches_one_process(setup, world):
    data_dir, reference = setup
    per_rank = run_world(_fit_layouts, world, init_pg=False, data_dir=str(data_dir), layouts=LAYOUTS[world])
    for name, got in merge_ranks(per_rank).items():
        ref = reference["ramp"] if LAYOUTS[world][name].get("ramp") else reference
        assert got["rows"] and min(len(set(row)) for row in got["rows"]) >= 2, name  # packed rows here too
        assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5, rel=0), name
        # The norm sums ~9M squared entries in a layout-dependent order; a wrong reduction
        # (double-counted replicas, a missing shard) is off by percents, not 1e-4.
        assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4), name
        assert set(got["grads"]) == set(ref["grads"]), name
        for param, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][param], grad, atol=1e-6, rtol=1e-5,
                                       msg=lambda m, p=param, n=name: f"{n}: grad of {p}: {m}")
        for param, value in ref["params"].items():
            torch.testing.assert_close(got["params"][param], value, atol=1e-5, rtol=0,
                                       msg=lambda m, p=param, n=name: f"{n}: {p}: {m}")


def test_checkpoint_resumes_under_another_layout(setup, tmp_path):
    """Saved by FSDP over 4 ranks after step 2, resumed as pp2 x tp2: step 3 as if never stopped."""
    data_dir, ref = setup
    resume = {"save": dict(dp_shard=4), "load": dict(pp=2, tp=2, dp_shard=1), "ckpt_dir": str(tmp_path / "ckpt")}
    got = merge_ranks(run_world(_fit_layouts, 4, init_pg=False, data_dir=str(data_dir), layouts={},
                                resume=resume))["resumed"]
    assert got["losses"] == pytest.approx(ref["losses"][STEPS - 1:], abs=1e-5, rel=0)
    assert set(got["params"]) == set(ref["params"])
    for param, value in ref["params"].items():
        torch.testing.assert_close(got["params"][param], value, atol=1e-5, rtol=0, msg=lambda m, p=param: f"{p}: {m}")
