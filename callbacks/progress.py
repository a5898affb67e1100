"""A progress bar that shows the few numbers worth watching, under short names."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

SHORT_NAMES = {"train/loss": "loss", "val/loss": "val_loss", "train/tokens_per_sec": "tok/s"}


class RecipeProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        shown = {SHORT_NAMES[k]: v for k, v in metrics.items() if k in SHORT_NAMES}
        if "tok/s" in shown and isinstance(shown["tok/s"], float):
            shown["tok/s"] = f"{shown['tok/s']:.0f}"
        return shown
