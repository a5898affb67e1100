"""Annealing: over the last ``anneal_tokens`` of the run the LR goes linearly to zero.

Section 3.4.3 of the paper anneals the 405B model over its final 40M tokens (with the data
mix switched to the highest-quality sources, and the final model the Polyak average of
checkpoints taken during annealing). The LR starts from the main schedule's value at the
first step that starts at or after ``anneal_start`` and falls linearly in tokens, reaching
exactly 0 at ``total_tokens``, where training stops. All of it is a function of the data
position, computed by the run plan (``recipe.plan``): this callback holds the settings and
stops the run.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from recipe.plan import AnnealSettings

__all__ = ["LRAnnealing"]


class LRAnnealing(L.Callback):
    def __init__(self, total_tokens: int, anneal_tokens: int = 40_000_000) -> None:
        """
        Args:
            total_tokens: tokens of the whole run (data position); training stops once the
                stream reaches it.
            anneal_tokens: length of the annealing phase at the end of the run (40M in the paper).
        """
        self.run_plan_settings = AnnealSettings(total_tokens, anneal_tokens)
        self.total_tokens = total_tokens
        self.anneal_tokens = anneal_tokens

    @property
    def anneal_start(self) -> int:
        return self.run_plan_settings.anneal_start

    def lr(self, position: int, scheduled_lr: float, start_lr: float) -> float:
        """LR of the step that starts at ``position``, given the main schedule's LR there and
        its LR at the first annealing step."""
        return self.run_plan_settings.lr(position, scheduled_lr, start_lr)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Where the next step starts: the data position, skipped steps included.
        if isinstance(batch, dict) and "next_position" in batch:
            position = int(batch["next_position"])
        else:
            position = int(getattr(trainer.datamodule, "position", 0))
        if position >= self.total_tokens:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"total_tokens": self.total_tokens, "anneal_tokens": self.anneal_tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A checkpoint written before the run plan also holds the start LR it recorded: the
        # plan computes it from the schedule instead, so it is not read.
        saved = (state_dict.get("total_tokens"), state_dict.get("anneal_tokens"))
        if None not in saved and saved != (self.total_tokens, self.anneal_tokens):
            rank_zero_warn(f"resuming with LR annealing over {self.anneal_tokens:,} of {self.total_tokens:,} tokens; "
                           f"the checkpoint's run annealed over {saved[1]:,} of {saved[0]:,}")
