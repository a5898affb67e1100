"""What the terminal shows during a run: a progress bar with the few numbers worth watching,
under short names, and a model summary with the training FLOPs ``recipe.flops`` counts."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.utilities import rank_zero_info

SHORT_NAMES = {"train/loss": "loss", "val/loss": "val_loss", "train/tokens_per_sec": "tok/s"}


def known_batches(batches: int | float, loaders: Any) -> int | float:
    """``batches`` if finite, else the step count of a single finite stream in ``loaders``.

    The recipe's evaluation streams are iterable datasets with a fixed ``num_steps`` but no
    ``__len__`` (Lightning warns about ``__len__`` on iterable datasets), so Lightning counts
    their batches as unknown and its bars read ``4/?``.
    """
    if batches != float("inf"):
        return batches
    if isinstance(loaders, (list, tuple)):
        if len(loaders) != 1:
            return batches
        loaders = loaders[0]
    steps = getattr(getattr(loaders, "dataset", None), "num_steps", None)
    return steps if isinstance(steps, int) and steps >= 0 else batches


class RecipeProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        shown = {SHORT_NAMES[k]: v for k, v in metrics.items() if k in SHORT_NAMES}
        if "tok/s" in shown and isinstance(shown["tok/s"], float):
            shown["tok/s"] = f"{shown['tok/s']:.0f}"
        return shown

    @property
    def total_val_batches_current_dataloader(self) -> int | float:
        return known_batches(super().total_val_batches_current_dataloader, self.trainer.val_dataloaders)

    @property
    def total_test_batches_current_dataloader(self) -> int | float:
        return known_batches(super().total_test_batches_current_dataloader, self.trainer.test_dataloaders)

    def init_validation_tqdm(self) -> Tqdm:
        # Lightning's own bar starts without a total and prints "0/?" until the first batch.
        has_main_bar = self.trainer.state.fn != "validate"
        total = known_batches(float("inf"), self.trainer.val_dataloaders)
        return Tqdm(desc=self.validation_description, total=convert_inf(total),
                    position=(2 * self.process_position + has_main_bar), disable=self.is_disabled,
                    leave=not has_main_bar, dynamic_ncols=True, file=sys.stdout, bar_format=self.BAR_FORMAT)


class RecipeModelSummary(L.Callback):
    """The model in two lines when training starts: exact parameter count and training FLOPs per token.

    Replaces Lightning's summary table, whose FLOPs column needs a forward pass over an
    ``example_input_array`` and reads 0 without one. The FLOPs are ``recipe.flops``' count
    (the one ``train/mfu`` uses) at every training sequence length of the run plan; the
    parameters are counted on the meta device, so a sharded or pipelined model is counted whole.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        arch = getattr(pl_module, "arch", None)
        if arch is None or not trainer.is_global_zero:
            return
        from recipe.model_info import training_summary

        rank_zero_info(training_summary(arch, training_seq_lens(pl_module, trainer)))


def training_seq_lens(pl_module: L.LightningModule, trainer: L.Trainer) -> list[int]:
    """The sequence lengths training steps take: the run plan's layouts, else the data's ``seq_len``."""
    plan = getattr(pl_module, "run_plan", None)
    if plan is not None:
        lengths = sorted({seq_len for _, seq_len, where in plan.layouts() if "validation" not in where})
        if lengths:
            return lengths
    seq_len = getattr(trainer.datamodule, "seq_len", None)
    return [int(seq_len)] if seq_len else []
