"""Annealing: over the last ``anneal_tokens`` of the run the LR goes linearly to zero.

Section 3.4.3 of the paper anneals the 405B model over its final 40M tokens (with the data
mix switched to the highest-quality sources, and the final model the Polyak average of
checkpoints taken during annealing). The LR starts from whatever the main schedule gives
at the first annealing step and falls linearly in tokens, reaching exactly 0 at
``total_tokens``, where training stops. Everything is a function of the tokens seen plus
the one LR recorded at the start, which is saved with the checkpoint.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from recipe.errors import ConfigError


class LRAnnealing(L.Callback):
    def __init__(self, total_tokens: int, anneal_tokens: int = 40_000_000) -> None:
        """
        Args:
            total_tokens: tokens of the whole run; training stops once they are seen.
            anneal_tokens: length of the annealing phase at the end of the run (40M in the paper).
        """
        if anneal_tokens <= 0 or total_tokens <= 0:
            raise ConfigError(f"LRAnnealing needs positive token counts, got total_tokens={total_tokens}, "
                              f"anneal_tokens={anneal_tokens}")
        if anneal_tokens > total_tokens:
            raise ConfigError(
                f"annealing over {anneal_tokens:,} tokens is longer than the run ({total_tokens:,} tokens); "
                "shorten anneal_tokens or raise total_tokens"
            )
        self.total_tokens = total_tokens
        self.anneal_tokens = anneal_tokens
        self.start_lr: float | None = None

    @property
    def anneal_start(self) -> int:
        return self.total_tokens - self.anneal_tokens

    def lr(self, tokens_seen: int, scheduled_lr: float) -> float:
        """LR of the step that starts after ``tokens_seen`` tokens."""
        if tokens_seen < self.anneal_start:
            return scheduled_lr
        if self.start_lr is None:
            self.start_lr = scheduled_lr
        remaining = max(0, self.total_tokens - tokens_seen)
        return self.start_lr * remaining / self.anneal_tokens

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.lr_override = self.lr

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        pl_module.phase = int(pl_module.tokens_seen >= self.anneal_start)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.tokens_seen >= self.total_tokens:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"start_lr": self.start_lr, "total_tokens": self.total_tokens, "anneal_tokens": self.anneal_tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_lr = state_dict.get("start_lr")
