"""Measured peak memory of one training step of the real recipe, per rank, on CPU.

The recipe's own Trainer path (``LlamaLightningModule`` under ``Parallel4DStrategy``, or
plain single-process) trains two steps on random tokens; the second - forward, backward,
clipping and an AdamW step whose state already exists - runs under
``recipe.memory.LiveTensorMemory``. Used by the planner's memory test and by
``bench/memory.py``; the multi-rank runs go through ``dist_harness.run_world``.
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from recipe.memory import LiveTensorMemory
from recipe.model import ModelArgs
from recipe.module import LlamaLightningModule
from recipe.config import OptimizerConfig
from recipe.planner import Estimate, Layout, estimate
from recipe.config import LRSchedule


@dataclass(frozen=True)
class Case:
    """One measured run: a layout of ``Parallel4DStrategy`` (empty: one process) and a batch."""

    strategy: dict[str, Any]
    seq_len: int
    micro_batch: int = 1
    n_micro: int = 1  # micro-batches per rank per step
    documents: int = 1  # equal documents per row (packed rows: more than one)
    attention: str = "auto"  # model.attention: auto runs segmented on CPU, dense is the masked reference

    def layout(self) -> Layout:
        """The same layout in the planner's terms."""
        s = self.strategy
        dp = s.get("dp_replicate", 1) * s.get("dp_shard", 1)
        return Layout(tp=s.get("tp", 1), cp=s.get("cp", 1), pp=s.get("pp", 1), dp=dp, dp_shard=s.get("dp_shard", 1),
                      stages_per_rank=s.get("pp_stages_per_rank", 1), schedule=s.get("pp_schedule", "1F1B"),
                      activation_checkpointing=s.get("activation_checkpointing", "none"),
                      checkpoint_every_n=s.get("activation_checkpointing_every_n", 2),
                      reduce_every_micro_batch=s.get("reduce_every_micro_batch", False))

    def estimate(self, args: ModelArgs, rank: int) -> Estimate:
        """The planner's memory of global rank ``rank`` for this CPU run (torch's for-loop AdamW)."""
        layout = self.layout()
        pp_rank = rank // (self.world // layout.pp)  # pp is the outermost mesh axis
        batch_tokens = layout.dp * self.n_micro * self.micro_batch * self.seq_len
        return estimate(args, layout, self.seq_len, batch_tokens, self.micro_batch,
                        precision=self.strategy.get("precision", "fp32"),
                        first_last_fewer=self.strategy.get("pp_first_last_fewer", False),
                        optimizer="for-loop", pp_rank=pp_rank,
                        attention="segmented" if self.attention == "auto" else self.attention)

    @property
    def world(self) -> int:
        s = self.strategy
        if not s:
            return 1
        return s.get("tp", 1) * s.get("cp", 1) * s.get("pp", 1) * s.get("dp_replicate", 1) * s.get("dp_shard", 1)


# The validation model: dim 256, 4 layers, a 2,048-token vocabulary, 512-token sequences.
# Parameter state (params + AdamW, 4M parameters) and activations are of the same order, so
# a wrong term in either shows.
ARGS = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=64,
                 ffn_dim_multiplier=None, max_seq_len=512)
SEQ = 512
SINGLE = {
    "single": Case({}, SEQ),
    # Three documents per row: segmented attention calls its kernel per document, writing one
    # output; the dense reference keeps a float mask per layer.
    "single_packed": Case({}, SEQ, documents=3),
    "single_dense": Case({}, SEQ, documents=3, attention="dense"),
}
TWO_RANKS = {
    "fsdp2": Case({"dp_shard": 2}, SEQ),
    # bf16 matmuls are ten times slower than fp32 on CPUs without bf16 units, yet a shorter
    # sequence would leave the activations too small a share of the peak to test.
    "fsdp2_bf16": Case({"dp_shard": 2, "precision": "bf16"}, SEQ),
    # Two micro-batches: gradients accumulate unsharded in fp32, or are reduce-scattered each time.
    "fsdp2_accumulate": Case({"dp_shard": 2}, SEQ, n_micro=2),
    "fsdp2_reduce_every_micro_batch": Case({"dp_shard": 2, "reduce_every_micro_batch": True}, SEQ, n_micro=2),
    "tp2": Case({"tp": 2, "dp_shard": 1}, SEQ),
    "tp2_packed": Case({"tp": 2, "dp_shard": 1}, SEQ, documents=3),
    # Each rank keeps the whole sequence's K/V (n_kv_heads), gathered and put in position order.
    "cp2": Case({"cp": 2, "dp_shard": 1}, SEQ),
    "cp2_packed": Case({"cp": 2, "dp_shard": 1}, SEQ, documents=3),
    # Three micro-batches: 1F1B holds two on the first rank, GPipe all three on both.
    "pp2_1f1b": Case({"pp": 2, "dp_shard": 1, "pp_schedule": "1F1B"}, SEQ, n_micro=3),
    "pp2_gpipe": Case({"pp": 2, "dp_shard": 1, "pp_schedule": "GPipe"}, SEQ, n_micro=3),
}


class MeasureStep(L.Callback):
    """Tracks live tensor bytes during training step ``step`` (0-based)."""

    def __init__(self, step: int = 1) -> None:
        self.step = step
        self.tracker: LiveTensorMemory | None = None
        self.result: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            gc.collect()  # dead reference cycles are not memory the step needs
            self.tracker = LiveTensorMemory(params=pl_module.parameters()).__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)
            self.result = asdict(self.tracker.result)
            self.tracker = None


def random_batches(args: ModelArgs, case: Case, steps: int, seed: int = 0) -> DataLoader:
    """``steps`` batches in the module's layout: tokens and doc ids ``[n_micro, micro_batch, seq_len + 1]``.

    ``case.documents`` equal documents per row: with one, attention without context
    parallelism is one causal kernel call for the whole micro-batch; with more, one per
    document. Every rank draws the same rows, as the ranks of a
    tensor, context or pipeline group must.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (case.n_micro, case.micro_batch, case.seq_len + 1)
    doc_ids = (torch.arange(case.seq_len + 1) * case.documents // (case.seq_len + 1)).expand(shape)
    batches = [{"tokens": torch.randint(0, args.vocab_size, shape, generator=gen), "doc_ids": doc_ids.clone()}
               for _ in range(steps)]
    return DataLoader(batches, batch_size=None, shuffle=False)


def measure_case(args: ModelArgs, case: Case, steps: int = 2) -> dict[str, Any]:
    """Peak live tensor bytes of this rank during the last of ``steps`` training steps."""
    from recipe.parallel.strategy import Parallel4DStrategy

    torch.manual_seed(0)
    args = replace(args, attention=case.attention)
    module = LlamaLightningModule(arch=args, optimizer=OptimizerConfig(lr=1e-4),
                                  lr_schedule=LRSchedule(warmup_steps=1, decay_steps=10, min_lr=1e-5))
    callback = MeasureStep(step=steps - 1)
    strategy = Parallel4DStrategy(**case.strategy) if case.strategy else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=case.world, strategy=strategy, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                        callbacks=[callback])
    trainer.fit(module, train_dataloaders=random_batches(args, case, steps))
    assert callback.result is not None, "the measured step never ran"
    return callback.result


def measure_cases(cases: dict[str, tuple[ModelArgs, Case]]) -> dict[str, dict[str, Any]]:
    """Every case in this process (all must have the world's size); results by case name."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = {}
    for name, (args, case) in cases.items():
        if case.world != world:
            raise ValueError(f"case {name} needs {case.world} ranks, the world has {world}")
        out[name] = measure_case(args, case)
    return out


def measure_in_world(cases: dict[str, tuple[ModelArgs, Case]], world: int,
                     timeout: float = 600) -> dict[str, list[dict[str, Any]]]:
    """Run ``(model, case)`` pairs of one world size on ``world`` fresh CPU ranks; per case,
    each rank's result.

    Fresh processes also for one rank: the tracker counts every tensor alive when the step
    starts, and a long-lived process (a test session) holds other work's tensors too.
    """
    from dist_harness import run_world

    per_rank = run_world(measure_cases, world, timeout=timeout, init_pg=False, cases=cases)
    return {name: [rank[name] for rank in per_rank] for name in cases}
